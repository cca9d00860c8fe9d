"""`make bench` (bench/run.py) fails when a benchmark fails, after running the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import run_benches

PROBES = {
    "ok": "def main(argv):\n    return 0\n",
    "results": "def main(argv):\n    return {'windows_lost': 0}\n",  # some benches return their results
    "lost": "def main(argv):\n    return 1\n",  # e.g. the fault soak when a window was lost
    "raises": "def main():\n    raise RuntimeError('no PostgreSQL')\n",
    "after": "from pathlib import Path\n\ndef main(argv):\n    Path('{mark}').write_text('ran')\n    return 0\n",
}


def test_a_bench_returning_non_zero_or_raising_fails_the_run_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mark = tmp_path / "after.txt"
    for name, code in PROBES.items():
        (tmp_path / f"bench_probe_{name}.py").write_text(code.replace("{mark}", str(mark)))
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = {name: f"bench_probe_{name}" for name in PROBES}
    assert run_benches(list(PROBES), modules, seconds=1.0) == ["lost", "raises"]
    assert mark.read_text() == "ran"
    err = capsys.readouterr().err
    assert (
        "bench lost failed: exit code 1" in err and "bench raises failed: RuntimeError: no PostgreSQL" in err
    )
