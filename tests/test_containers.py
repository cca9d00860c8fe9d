"""deploy/containers as shipped, checked without a container runtime (none runs here, and no registry
serves base images): what each Dockerfile copies is in the build context, every ``edgefleet`` command the
images, compose.yaml and the README run parses with the real CLI, the configs they mount load with the
real parsers and name secrets and volumes the services get, compose.yaml validates against the Compose
Specification's JSON schema, the agent image's install resolves without torch (x86_64 and aarch64), and
the scripts the containers run (broker entrypoint, healthchecks, PostgreSQL init) do their job here.
deploy/containers/README.md says what only a Docker host can check."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.cli import build_parser
from tests.conftest import PG_SERVER, _pg_admin_url, require

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "deploy" / "containers"
COMPOSE = CONTAINERS / "compose.yaml"
HEALTHCHECK = CONTAINERS / "healthcheck.py"
DOCKERFILES = {name: CONTAINERS / f"Dockerfile.{name}" for name in ("agent", "trainer", "broker")}
SCHEMA_PACKAGE = "dclint@3.1.0"
"""An npm package that ships the Compose Specification's JSON schema (schemas/compose.schema.json)."""
SECRETS = "/run/secrets/"


# --- reading the files ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions: comments dropped, continuation lines joined."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        start = start or n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending, start = "", 0
    return out


def exec_form(args: str) -> list[str]:
    """A JSON-array CMD/HEALTHCHECK CMD as its argv (shell form is refused: these images use exec form)."""
    assert args.startswith("["), f"not exec form: {args}"
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def healthcheck_argv(dockerfile: Path) -> list[str]:
    """The argv of a Dockerfile's HEALTHCHECK CMD (after its --interval=... options)."""
    (hc,) = [i for i in instructions(dockerfile) if i.keyword == "HEALTHCHECK"]
    return exec_form(hc.args[hc.args.index("CMD ") + 4 :].strip())


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``: from ``env``, else the default, else
    a stand-in for a required value (what .env would hold)."""

    def repl(m: re.Match[str]) -> str:
        name, kind, rest = m.group(1), m.group(2), m.group(3)
        if env and name in env:
            return env[name]
        return rest if kind == "-" else f"stand-in-{name.lower()}"

    return _VAR.sub(repl, value)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it (interpolated)."""
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def edgefleet_argv(command: list[str]) -> list[str] | None:
    """The ``edgefleet ...`` argv a command runs: itself, or what ``sh -c '... exec edgefleet ...'`` runs."""
    if command[:1] == ["edgefleet"]:
        return command
    if command[:2] == ["sh", "-c"]:
        _, _, tail = command[2].partition("exec ")
        return edgefleet_argv(shlex.split(tail)) if tail else None
    return None


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(service, edgefleet argv)`` of every ``docker compose run|exec SERVICE edgefleet ...`` line in the
    README's code blocks."""
    out, in_code = [], False
    for line in (CONTAINERS / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not (in_code and "docker compose" in line and " edgefleet " in line):
            continue
        head, _, tail = line.partition(" edgefleet ")
        out.append((head.split()[-1], ["edgefleet", *shlex.split(tail.split("  #")[0])]))
    return out


# --- the build context -----------------------------------------------------------------------------------
def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match, plus ``**`` for any number of directories)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignored(rel: str, dockerignore: Path) -> bool:
    """Whether the builder leaves ``rel`` out of the context: the last pattern that matches it or one of
    its parent directories decides (``!`` lets it in), as Docker's pattern matcher does."""
    patterns = [
        p.strip() for p in dockerignore.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for p in patterns:
        negate = p.startswith("!")
        rx = _pattern(p.lstrip("!").strip("/"))
        if any(rx.fullmatch(prefix) for prefix in prefixes):
            verdict = not negate
    return verdict


def test_every_copy_source_is_in_the_repository_and_in_the_build_context() -> None:
    """A COPY of a file the repository lacks, or one .dockerignore leaves out, fails only at build time."""
    dockerignore = REPO / ".dockerignore"
    assert ignored(".venv/bin/python", dockerignore) and ignored("build/edgefleet_guard.so", dockerignore)
    assert ignored("bench/results/x.json", dockerignore) and ignored(".git/HEAD", dockerignore)
    assert ignored("deploy/containers/secrets/pki/ca.key", dockerignore)
    assert ignored("trainer/__pycache__/x.pyc", dockerignore)
    for name, dockerfile in DOCKERFILES.items():
        copies = [i for i in instructions(dockerfile) if i.keyword in ("COPY", "ADD")]
        assert copies, name
        for ins in copies:
            tokens = shlex.split(ins.args)
            if any(t.startswith("--from=") for t in tokens):
                continue
            sources = [t for t in tokens if not t.startswith("--")][:-1]
            for src in sources:
                where = f"{dockerfile.name}:{ins.line}: COPY {src}"
                assert (REPO / src).exists(), f"{where}: not in the repository"
                files = [REPO / src] if (REPO / src).is_file() else list((REPO / src).rglob("*.py"))
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not ignored(rel, dockerignore), f"{where}: .dockerignore leaves out {rel}"


# --- the commands ----------------------------------------------------------------------------------------
def all_commands() -> list[tuple[str, list[str]]]:
    """``(where, edgefleet argv)`` of every command the images, compose.yaml and the README run."""
    out = []
    for name in ("agent", "trainer"):
        (cmd,) = [i for i in instructions(DOCKERFILES[name]) if i.keyword == "CMD"]
        out.append((f"Dockerfile.{name} CMD", exec_form(cmd.args)))
    for svc_name, svc in compose()["services"].items():
        if "command" in svc:
            argv = edgefleet_argv(svc["command"])
            assert argv is not None, f"compose.yaml {svc_name}: command is not an edgefleet command"
            out.append((f"compose.yaml {svc_name}", argv))
    services = compose()["services"]
    for svc_name, argv in readme_commands():
        assert svc_name in services, f"README: docker compose ... {svc_name}: no such service"
        out.append((f"README ({svc_name})", argv))
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    """The real ``edgefleet`` parser on ``argv`` (without the program name), nothing executed."""
    args = argv[1:]
    return build_parser(args).parse_args(args)


def test_every_edgefleet_command_parses_with_the_real_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """A renamed command or flag (say --db after it became --database) would make a container exit 2."""
    commands = all_commands()
    assert len(readme_commands()) >= 6, "the README's first-time steps are checked too"
    for where, argv in commands:
        try:
            ns = parse(argv)
        except SystemExit as exc:  # --help exits 0; a bad flag or command exits 2
            assert exc.code == 0, f"{where}: {shlex.join(argv)}: {capsys.readouterr().err.strip()}"
            continue
        assert callable(getattr(ns, "func", None)), f"{where}: {shlex.join(argv)} runs nothing"
    subcommands = {tuple(a for a in argv[1:3] if not a.startswith("-")) for _, argv in commands}
    for sub in sorted(subcommands):  # --help of each group/command, by the installed entry point
        run = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", *sub, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, f"edgefleet {' '.join(sub)} --help: {run.stderr}"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path or volume name, of a service's volumes (short syntax, interpolated)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = interpolate(v).split(":")[:2]
        out[target] = source
    return out


def _secret_targets(service: dict[str, Any]) -> set[str]:
    """The files a service finds under /run/secrets/."""
    return {s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets", [])}


def _loaded_config(service: dict[str, Any], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The config file a service's ``--config`` names, from the repository file mounted there, loaded as
    the container would (its environment) by the agent's or the trainer's own loader."""
    path = argv[argv.index("--config") + 1]
    source = _mounts(service).get(path)
    assert source is not None and source.startswith("."), f"nothing from the repository is mounted at {path}"
    for name, value in service_env(service).items():
        monkeypatch.setenv(name, value)
    host = (CONTAINERS / source).resolve()
    if argv[1:3] == ["agent", "run"]:
        from edge_agent.config import load_config

        return load_config(host)
    from trainer.fleet.config import load_service_config

    return load_service_config(host)


def _absolute_paths(section: Any) -> Iterator[Path]:
    """Every path field of a loaded config (relative ones resolved against the file), in every section."""
    from pydantic import BaseModel

    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, Path):
            yield value
        elif isinstance(value, BaseModel):
            yield from _absolute_paths(value)


def test_the_configs_services_mount_load_and_name_only_secrets_and_volumes_they_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trainer.yaml and sim-agent.yaml, loaded with the real parsers under each service's environment:
    every /run/secrets/ file they name is one of that service's secrets, every other path is in a volume."""
    checked = 0
    for name, svc in compose()["services"].items():
        argv = edgefleet_argv(svc.get("command", []))
        if not argv or "--config" not in argv:
            continue
        with monkeypatch.context() as m:
            cfg = _loaded_config(svc, argv, m)
        secrets, mounts = _secret_targets(svc), _mounts(svc)
        for path in _absolute_paths(cfg):
            p = path.as_posix()
            if p.startswith(SECRETS):
                assert p[len(SECRETS) :] in secrets, f"{name}: its config reads {p}, not one of its secrets"
            else:
                assert any(p == t or p.startswith(t.rstrip("/") + "/") for t in mounts), (
                    f"{name}: {p} unmounted"
                )
        checked += 1
    assert checked == 4  # trainer, console, sim-01, sim-02


def test_the_healthchecks_read_what_the_configs_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer image's check reads metrics.port of trainer.yaml; the console's, its --port; the agent
    image's, the config its CMD runs, whose metrics.textfile is in the state volume."""
    services = compose()["services"]
    trainer_cfg = _loaded_config(services["trainer"], services["trainer"]["command"], monkeypatch)
    assert trainer_cfg.metrics is not None and trainer_cfg.console is None  # the console runs on its own
    hc_trainer = healthcheck_argv(DOCKERFILES["trainer"])
    url = hc_trainer[hc_trainer.index("http") + 1]
    assert url == f"http://127.0.0.1:{trainer_cfg.metrics.port}/metrics"
    console = services["console"]
    port = console["command"][console["command"].index("--port") + 1]
    assert console["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/healthz"
    assert any(p.endswith(f":{port}") for p in console["ports"])
    agent_cmd = exec_form(next(i for i in instructions(DOCKERFILES["agent"]) if i.keyword == "CMD").args)
    hc = healthcheck_argv(DOCKERFILES["agent"])
    assert hc[hc.index("--config") + 1] == agent_cmd[agent_cmd.index("--config") + 1]
    sim = services["sim-01"]
    agent_cfg = _loaded_config(sim, sim["command"], monkeypatch)
    assert (
        agent_cfg.metrics
        and agent_cfg.metrics.textfile
        and str(agent_cfg.metrics.textfile).startswith(str(agent_cfg.state_dir))
    )


# --- compose.yaml ---------------------------------------------------------------------------------------
def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema from the npm package that ships it (kept under build/)."""
    cache = REPO / "build" / "compose-spec" / SCHEMA_PACKAGE.replace("@", "-")
    schema = cache / "compose.schema.json"
    if not schema.exists():
        npm = shutil.which("npm")
        require(npm is not None, "npm (for the Compose Specification schema)")
        assert npm is not None
        cache.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [npm, "pack", SCHEMA_PACKAGE, "--pack-destination", str(cache), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        require(run.returncode == 0, f"npm pack {SCHEMA_PACKAGE} ({run.stderr.strip()[-300:]})")
        tgz = cache / json.loads(run.stdout)[0]["filename"]
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/schemas/compose.schema.json")
            assert member is not None
            schema.write_bytes(member.read())
    return json.loads(schema.read_text())


def test_compose_validates_against_the_compose_specification() -> None:
    """The Compose Specification's JSON schema (what `docker compose config` validates against)."""
    import jsonschema

    schema = compose_schema()
    assert schema.get("title") == "Compose Specification"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    broken = compose()
    broken["services"]["trainer"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)  # the schema does check what we rely on


def test_compose_structure_holds_together() -> None:
    """What the schema cannot see: references resolve, repository paths exist, host ports are unique, the
    services' listener and the database stay unpublished, the database is migrated before the trainer,
    the init scripts run in order, and every long-running service has a healthcheck."""
    c = compose()
    services, volumes, secrets = c["services"], set(c["volumes"]), set(c["secrets"])
    published: dict[tuple[str, str], str] = {}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}: no such service"
        for s in svc.get("secrets", []):
            assert (s if isinstance(s, str) else s["source"]) in secrets, f"{name}: secret {s} undefined"
        for raw in svc.get("volumes", []):
            source, target = interpolate(raw).split(":")[:2]
            if raw.startswith("."):  # a repository file, not one the first-time steps make (${...})
                assert (CONTAINERS / source).exists(), (
                    f"{name}: {source} (mounted at {target}) is not in the repo"
                )
            elif not raw.startswith(("$", "/")):
                assert source in volumes, f"{name}: volume {source} undefined"
        for port in svc.get("ports", []):
            *host, container = port.split(":")
            key = (host[0] if len(host) == 2 else "0.0.0.0", host[-1])
            assert key not in published, f"{name} and {published[key]} both publish {key}"
            published[key] = name
            assert container not in ("8884", "5432"), f"{name} publishes {container}"
        if "build" in svc:
            assert (CONTAINERS / svc["build"]["context"]).resolve() == REPO
            assert (REPO / svc["build"]["dockerfile"]).is_file()
        if svc.get("restart", "no") != "no":
            in_image = "build" in svc and any(
                i.keyword == "HEALTHCHECK" for i in instructions(REPO / svc["build"]["dockerfile"])
            )
            assert "healthcheck" in svc or in_image, f"{name} runs for good without a healthcheck"
    assert services["trainer"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"][1:3] == ["db", "upgrade"] and "edgefleet_owner@" in " ".join(
        services["migrate"]["command"]
    )
    init = sorted(t for t in _mounts(services["postgres"]) if t.startswith("/docker-entrypoint-initdb.d/"))
    assert [_mounts(services["postgres"])[t] for t in init] == [
        "../postgres/roles.sql", "./postgres/20-passwords.sh"
    ]  # fmt: skip
    for secret in c["secrets"].values():
        assert secret["file"].startswith("${EDGEFLEET_SECRETS:-./secrets}/")
    assert ignored("deploy/containers/secrets/x", REPO / ".dockerignore")


def test_the_sim_agents_find_the_package_the_sim_model_service_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sim-model writes into the sim-models volume at its mount; the agents read it at theirs."""
    services = compose()["services"]
    out = Path(edgefleet_argv(services["sim-model"]["command"])[-1])  # type: ignore[index]
    (writer_mount,) = [t for t, s in _mounts(services["sim-model"]).items() if s == "sim-models"]
    for name in ("sim-01", "sim-02"):
        agent = services[name]
        (reader_mount,) = [t for t, s in _mounts(agent).items() if s.startswith("sim-models")]
        with monkeypatch.context() as m:
            cfg = _loaded_config(agent, agent["command"], m)
        assert cfg.model.package == Path(reader_mount) / out.relative_to(writer_mount)
        assert cfg.device_id == name and f"{name}.crt" in {
            s["source"] for s in agent["secrets"] if isinstance(s, dict)
        }


# --- the images' installs --------------------------------------------------------------------------------
def _pip_line(dockerfile: Path) -> str:
    """The RUN that installs the edgefleet wheel."""
    (run,) = [i.args for i in instructions(dockerfile) if i.keyword == "RUN" and "edgefleet-*.whl" in i.args]
    return run


_OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|ConnectTimeout|Max retries"
)
"""pip's words for an index it cannot reach (skipped locally, a failure in CI), not a resolution failure."""

AARCH64 = [f"manylinux_2_{v}_aarch64" for v in range(17, 37)] + ["manylinux2014_aarch64"]
X86_64 = [f"manylinux_2_{v}_x86_64" for v in range(17, 37)] + ["manylinux2014_x86_64"]


def _resolve(wheel: Path, extra: str, platforms: list[str], tmp: Path) -> dict[str, str]:
    """What pip would install for ``wheel[extra]`` with constraints.txt on CPython 3.11 for ``platforms``
    (binary wheels only, from an empty target: nothing installed here counts). Name -> version."""
    report = tmp / f"report-{platforms[0]}.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
            "--ignore-installed", "--target", str(tmp / "unused"), "--report", str(report),
            "--only-binary=:all:", "--python-version", "3.11", *(f"--platform={p}" for p in platforms),
            "-c", str(REPO / "constraints.txt"), f"{wheel}[{extra}]",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    require(not _OFFLINE.search(run.stderr), f"the package index ({run.stderr.strip()[-300:]})")
    assert run.returncode == 0, run.stderr[-3000:]
    return {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }


def test_the_agent_image_installs_the_edge_extra_and_never_torch(tmp_path: Path) -> None:
    """Dockerfile.agent's install line (the wheel's [edge] extra at constraints.txt's versions) resolved for
    real against PyPI for the x86_64 and the aarch64 (Raspberry Pi) image: ONNX Runtime and LiteRT, no
    torch, nothing from the trainer extra."""
    line = _pip_line(DOCKERFILES["agent"])
    assert (
        "[edge]" in line
        and "-c /opt/edgefleet-build/constraints.txt" in line
        and "torch" not in line.split("&&")[1]
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path / "wheels"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    require(build.returncode == 0, f"building the edgefleet wheel ({build.stderr.strip()[-300:]})")
    (wheel,) = (tmp_path / "wheels").glob("edgefleet-*.whl")
    for platforms in (X86_64, AARCH64):
        installed = _resolve(wheel, "edge", platforms, tmp_path)
        assert {"onnxruntime", "ai-edge-litert", "opencv-python-headless", "edgefleet"} <= set(installed)
        heavy = {"torch", "torchvision", "litert-torch", "jax", "sqlalchemy", "fastapi"} & set(installed)
        assert not heavy, f"{platforms[0]}: the agent image would install {sorted(heavy)}"


def test_the_trainer_image_takes_only_torch_from_the_cpu_index() -> None:
    """torch 2.13.0 alone (--no-deps) from the CPU index, everything else from PyPI at constraints.txt's
    versions, and a build that stops if the torch it got is not 2.13.0 CPU."""
    args = {
        i.args.split("=")[0]: i.args.split("=", 1)[1]
        for i in instructions(DOCKERFILES["trainer"])
        if i.keyword == "ARG"
    }
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    line = _pip_line(DOCKERFILES["trainer"])
    torch_step, rest = line.split("&&")[1], "&&".join(line.split("&&")[2:])
    assert '--no-deps --index-url "${TORCH_INDEX_URL}" torch==2.13.0' in " ".join(torch_step.split())
    assert "--index-url" not in rest and "[trainer]" in rest and "constraints.txt" in rest
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().splitlines()
    assert "torch.version.cuda is None" in rest


# --- the scripts the containers run ----------------------------------------------------------------------
def _broker_env(tmp: Path, conf: Path) -> dict[str, str]:
    """broker-entrypoint.sh's paths pointed into ``tmp``; `mosquitto` is echo, so its argv is printed."""
    secrets = tmp / "secrets"
    return os.environ | {
        "EDGEFLEET_BROKER_CONF": str(conf),
        "EDGEFLEET_BROKER_CONF_OUT": str(tmp / "edgefleet.conf"),
        "EDGEFLEET_BROKER_SECRETS": str(secrets),
        "EDGEFLEET_BROKER_CERTS": str(tmp / "certs"),
        "EDGEFLEET_BROKER_DATA": str(tmp / "data"),
        "EDGEFLEET_BROKER_USER": subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
        "EDGEFLEET_BROKER_EXEC": "echo",
    }


def test_the_broker_entrypoint_opens_only_the_services_listener_and_installs_the_certificates(
    tmp_path: Path,
) -> None:
    """deploy/mosquitto/edgefleet.conf changed in exactly one line; the key copied 0600; a missing secret or
    a changed listener line stops the container with a line saying what is wrong."""
    shipped = REPO / "deploy" / "mosquitto" / "edgefleet.conf"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("ca.crt", "broker.crt", "broker.key"):
        (secrets / name).write_text(name)
    (secrets / "broker.key").chmod(0o644)
    env = _broker_env(tmp_path, shipped)
    script = str(CONTAINERS / "broker-entrypoint.sh")
    run = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["-c", str(tmp_path / "edgefleet.conf")]  # exec mosquitto -c CONF
    before, after = shipped.read_text().splitlines(), (tmp_path / "edgefleet.conf").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and changed == [("listener 8884 127.0.0.1", "listener 8884")]
    assert (tmp_path / "certs" / "broker.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "certs" / "ca.crt").read_text() == "ca.crt"
    (secrets / "broker.key").unlink()
    missing = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "broker.key" in missing.stderr
    other = tmp_path / "other.conf"
    other.write_text(shipped.read_text().replace("listener 8884 127.0.0.1", "listener 8884 10.0.0.1"))
    refused = subprocess.run(["sh", script], env=_broker_env(tmp_path, other), capture_output=True, text=True)
    assert refused.returncode == 1 and "listener 8884 127.0.0.1" in refused.stderr


def test_the_broker_healthcheck_sees_both_listeners() -> None:
    """Dockerfile.broker's check (the kernel's socket tables) on this machine, with its two ports swapped
    for two this test listens on: healthy with both open, unhealthy with one."""
    (hc,) = [i for i in instructions(DOCKERFILES["broker"]) if i.keyword == "HEALTHCHECK"]
    command = hc.args[hc.args.index("CMD ") + 4 :]
    assert f"{8883:04X}" in command and f"{8884:04X}" in command
    first, second = socket.socket(), socket.socket()
    try:
        for s in (first, second):
            s.bind(("0.0.0.0", 0))
            s.listen()
        ports = [f"{s.getsockname()[1]:04X}" for s in (first, second)]
        mine = command.replace(f"{8883:04X}", ports[0]).replace(f"{8884:04X}", ports[1])
        assert subprocess.run(["sh", "-c", mine], timeout=10).returncode == 0
        second.close()
        assert subprocess.run(["sh", "-c", mine], timeout=10).returncode == 1
    finally:
        first.close()
        second.close()


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60
    )


def test_the_agent_healthcheck_follows_a_real_agents_windows(tmp_path: Path) -> None:
    """A real agent (tiny model, synthetic frames, no broker reachable: it spools) rewrites its textfile each
    window, so the image's check passes; after it stopped, the file ages past 3 windows and it fails."""
    from trainer.ops.broker import free_port
    from trainer.sim.tiny import build_tiny_package

    cfg = {
        "device_id": "cam-health",
        "state_dir": str(tmp_path / "state"),
        "source": {"uri": "synthetic:?fps=20"},
        "model": {"package": str(build_tiny_package(tmp_path / "pkg").root), "artifact": "onnx-fp32"},
        "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},
        "telemetry": {"window_seconds": 1.0},
        "spool": {"flush_timeout_s": 0},
        "metrics": {"textfile": str(tmp_path / "state" / "agent.prom")},
    }
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert "no telemetry window written yet" in _healthcheck("agent", "--config", str(config)).stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "state" / "agent.prom").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        healthy = _healthcheck("agent", "--config", str(config))
        assert healthy.returncode == 0 and healthy.stdout.startswith("healthy: last window"), healthy.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    time.sleep(0.6)
    stale = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "agent", "--config", str(config)],
        env=os.environ | {"EDGEFLEET_HEALTH_MAX_AGE_S": "0.5"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stale.returncode == 1 and "the frame loop is stuck" in stale.stdout, stale.stdout
    del cfg["metrics"]
    config.write_text(yaml.safe_dump(cfg))
    unconfigured = _healthcheck("agent", "--config", str(config))
    assert unconfigured.returncode == 1 and "no metrics.textfile" in unconfigured.stdout


class _Metrics(http.server.BaseHTTPRequestHandler):
    """/metrics: the trainer service's store_up series in the real exposition format; /down: a 503."""

    store_up = 1.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        from prometheus_client import CollectorRegistry, Gauge, generate_latest

        registry = CollectorRegistry()
        Gauge("edgefleet_store_up", "store", ["fleet"], registry=registry).labels("shop").set(self.store_up)
        body = generate_latest(registry)
        self.send_response(200 if self.path == "/metrics" else 503)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_http_healthcheck_reads_the_trainer_services_store_up() -> None:
    """The trainer image's check against a real Prometheus exposition: healthy with store_up 1, unhealthy
    with 0, with an error status, or with nothing listening."""
    argv = healthcheck_argv(DOCKERFILES["trainer"])
    expect = argv[argv.index("--expect") + 1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _healthcheck("http", f"{base}/metrics", "--expect", expect).returncode == 0
        _Metrics.store_up = 0.0
        down = _healthcheck("http", f"{base}/metrics", "--expect", expect)
        assert down.returncode == 1 and "nothing matches" in down.stdout
        assert _healthcheck("http", f"{base}/down").returncode == 1
    finally:
        _Metrics.store_up = 1.0
        server.shutdown()
        server.server_close()
    gone = _healthcheck("http", f"{base}/metrics", "--timeout", "2")
    assert gone.returncode == 1 and gone.stdout.startswith("unhealthy:")


def _scram_matches(secret: str, password: str) -> bool:
    """Whether a PostgreSQL SCRAM-SHA-256 verifier (pg_authid.rolpassword) was made from ``password``."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", secret)
    assert m, secret
    iterations, salt, stored = int(m.group(1)), base64.b64decode(m.group(2)), base64.b64decode(m.group(3))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == stored


def test_the_postgres_init_scripts_create_the_roles_with_the_passwords_from_env() -> None:
    """roles.sql then 20-passwords.sh, as the postgres image runs them (psql over the server's connection
    settings from the environment), on a real PostgreSQL with unique role names: both roles end with the
    passwords of .env, quoted by psql (a quote in a password is data, not SQL)."""
    require(_pg_admin_url() is not None, f"PostgreSQL at {PG_SERVER}")
    require(shutil.which("psql") is not None, "the psql client")
    from sqlalchemy.engine import make_url

    tag = uuid.uuid4().hex[:8]
    names = {"edgefleet_owner": f"ef_owner_{tag}", "edgefleet_app": f"ef_app_{tag}"}
    db = f"ef_init_{tag}"

    def renamed(text: str) -> str:
        for old, new in names.items():
            text = text.replace(old, new)
        return text.replace("DATABASE edgefleet OWNER", f"DATABASE {db} OWNER").replace(
            "\\connect edgefleet", f"\\connect {db}"
        )

    admin = make_url(PG_SERVER)
    env = os.environ | {
        "PGHOST": str(admin.host), "PGPORT": str(admin.port or 5432), "POSTGRES_USER": str(admin.username),
        "EDGEFLEET_OWNER_DB_PASSWORD": "owner pw with ' quote", "EDGEFLEET_APP_DB_PASSWORD": "app-pw;DROP",
    }  # fmt: skip
    roles_sql = renamed((REPO / "deploy" / "postgres" / "roles.sql").read_text())
    script = renamed((CONTAINERS / "postgres" / "20-passwords.sh").read_text())
    psql = ["psql", "-v", "ON_ERROR_STOP=1", "-q", "-U", str(admin.username), "-d", "postgres"]
    try:
        first = subprocess.run([*psql, "-f", "-"], input=roles_sql, env=env, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        query = "SELECT rolname, rolpassword FROM pg_authid WHERE rolname LIKE 'ef_%_" + tag + "'"
        rows = subprocess.run([*psql, "-At", "-F", " ", "-c", query], env=env, capture_output=True, text=True)
        secrets = dict(line.split(" ", 1) for line in rows.stdout.splitlines())
        assert _scram_matches(secrets[names["edgefleet_owner"]], env["EDGEFLEET_OWNER_DB_PASSWORD"])
        assert _scram_matches(secrets[names["edgefleet_app"]], env["EDGEFLEET_APP_DB_PASSWORD"])
        unset = {k: v for k, v in env.items() if k != "EDGEFLEET_APP_DB_PASSWORD"}
        refused = subprocess.run(["sh", "-c", script], env=unset, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "EDGEFLEET_APP_DB_PASSWORD" in refused.stderr
    finally:
        for statement in (
            f"DROP DATABASE IF EXISTS {db} WITH (FORCE)",
            *(f"DROP ROLE IF EXISTS {n}" for n in names.values()),
        ):
            subprocess.run([*psql, "-c", statement], env=env, capture_output=True, timeout=60)
