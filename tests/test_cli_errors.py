"""Every command group answers a bad argument or a bad file with one line on stderr and exit code 2.

Each case runs the real ``edgefleet`` entry point in a subprocess, as a user would; ``-v`` brings the
traceback back for the same error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.sim.tiny import build_tiny_package


def _edgefleet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "bad.yaml").write_text("broker: [1, 2\n")
    (d / "notpkg").mkdir()
    (d / "notpkg" / "model.json").write_text("{not json")
    build_tiny_package(d / "pkg")
    (d / "labels.csv").write_text("sample_id,label\n1,not-a-label\n")
    (d / "afile").write_text("a file, not a directory\n")
    from trainer.release.repository import ReleaseRepository
    from trainer.store import Store

    Store(f"sqlite:///{d / 'fleet.db'}").close()
    repo = ReleaseRepository.init(d / "repo")
    for name in ("colour", "shade"):  # two models in one fleet: rollout commands must be told which
        repo.publish(build_tiny_package(d / name, name=name).root, channel="stable", fleet="f")
    return d


# (group, arguments, what the one line must name)
CASES = [
    ("agent", ["agent", "run", "--config", "bad.yaml"], "bad.yaml"),
    ("model", ["model", "inspect", "notpkg"], "notpkg/model.json"),
    ("data", ["data", "check", "missing-dir"], "missing-dir"),
    ("train", ["train", "--data", "missing-dir", "--out", "out"], "missing-dir"),
    ("eval", ["eval", "--package", "notpkg", "--data", "missing-dir"], "notpkg/model.json"),
    ("release", ["release", "status", "--repo", "missing-repo"], "missing-repo"),
    ("pki", ["pki", "issue-device", "cam1", "--dir", "missing-pki"], "missing-pki"),
    ("ingest", ["ingest", "dead-letters", "--db", "sqlite:///missing-dir/fleet.db"], "missing-dir"),
    ("trainer", ["trainer", "serve", "--config", "bad.yaml"], "bad.yaml"),
    (
        "labels",
        ["labels", "import", "labels.csv", "--db", "sqlite:///fleet.db", "--package", "pkg"],
        "labels.csv",
    ),
    (
        "rollout",
        ["rollout", "status", "--db", "sqlite:///missing-dir/f.db", "--repo", "missing-repo", "--fleet", "f"],
        "missing-repo",
    ),
    ("demo", ["demo", "--workdir", "afile"], "afile"),
    (
        "labels-typo",
        ["labels", "export", "--db", "sqlite:///fleeet.db", "--out", "q.csv", "--package", "pkg"],
        "fleeet.db",
    ),
    (
        "db-two-slashes",  # SQLAlchemy read fleeet.db as a host: a multi-line ArgumentError, exit 1
        ["labels", "export", "--db", "sqlite://fleeet.db", "--out", "q.csv", "--package", "pkg"],
        "has no host; for the file fleeet.db write sqlite:///fleeet.db",
    ),
    (
        "rollout-model",
        # TLS flags are accepted (they were not); the model is not guessed as the demo's
        [
            *("rollout", "promote", "--db", "sqlite:///fleet.db", "--repo", "repo", "--fleet", "f"),
            *(
                "--reason",
                "r",
                "--broker",
                "mqtts://broker:8884",
                "--ca",
                "ca.crt",
                "--cert",
                "t.crt",
                "--key",
                "t.key",
            ),
        ],
        "models colour, shade: pass --model",
    ),
]


@pytest.mark.parametrize(("group", "args", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(
    workdir: Path, group: str, args: list[str], names: str
) -> None:
    result = _edgefleet(*args, cwd=workdir)
    assert not (workdir / "fleeet.db").exists()  # a mistyped URL creates no empty database
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("edgefleet: error: "), result.stderr[-2000:]
    assert names in lines[0], lines[0]


def test_verbose_shows_the_traceback(workdir: Path) -> None:
    result = _edgefleet("-v", "model", "inspect", "notpkg", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "PackageError" in result.stderr
