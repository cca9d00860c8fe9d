"""Schema migrations (Alembic) on SQLite and PostgreSQL (every test runs on both).

A database written by the last release before migrations (3ff547b; its schema module is frozen in
tests/fixtures/schema_3ff547b.py) and filled with rows in every table is upgraded by the real
``edgefleet db upgrade`` and loses nothing; upgrading again does nothing; the service, the console and
ingest refuse an older schema with one line and exit 2 and leave it as it was; a fresh store records
head; and Alembic's autogenerate finds no difference between the models and a migrated database.
"""

from __future__ import annotations

import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import tomllib
from sqlalchemy import Connection, Engine, inspect, select, text
from sqlalchemy import insert as sa_insert

from edge_agent.package import Artifact, FileEntry, ModelManifest, PreprocessSpec, TensorSpec
from edge_agent.protocol import Status, UpdateEvent
from edge_agent.telemetry.histogram import default_edges
from tests.fixtures import schema_3ff547b as old
from trainer.errors import SchemaOutdated, StoreError
from trainer.sim.windows import NUM_CLASSES, model_ref, windows
from trainer.store import Store, migrate
from trainer.store.engine import make_engine
from trainer.store.schema import Base

ROOT = Path(__file__).resolve().parents[1]
HEAD = migrate.head()
WINDOWS = windows("cam1", 3, fleet="shop")
"""Two written by the old release, the third by today's store after the upgrade."""


def _edgefleet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _manifest() -> str:
    ref = model_ref()
    return ModelManifest(
        name=ref.name,
        version=ref.version,
        created="2025-01-01T00:00:00Z",
        labels=["cat", "dog"],
        preprocess=PreprocessSpec(),
        artifacts={
            "tflite-int8": Artifact(
                file="model.tflite",
                runtime="litert",
                precision="int8",
                input=TensorSpec(),
                output=TensorSpec(layout="NC"),
            )
        },
        files={"model.tflite": FileEntry(sha256="0" * 64, size=1)},
        telemetry_edges=default_edges(NUM_CLASSES),
    ).model_dump_json(exclude_none=True)


def _status(device: str, state: str, session: int, ts: float) -> str:
    model = model_ref() if state == "online" else None
    return Status(
        fleet="shop", device=device, state=state, session=session, ts=ts, model=model
    ).model_dump_json(exclude_none=True)


def _update(device: str, session: int, seq: int, ts: float, state: str) -> str:
    event = UpdateEvent(fleet="shop", device=device, session=session, seq=seq, ts=ts, state=state)
    return event.model_dump_json(exclude_none=True)


def _window_row(i: int) -> dict[str, Any]:
    w = WINDOWS[i]
    return {
        "fleet": w.fleet,
        "device": w.device,
        "session": w.session,
        "seq": w.seq,
        "start": w.start,
        "end": w.end,
        "model_name": w.model.name,
        "model_version": w.model.version,
        "model_sha256": w.model.sha256,
        "artifact": w.model.artifact,
        "frames_inferred": w.frames.inferred,
        "frames_failed": w.frames.failed,
        "confidence_mean": w.confidence_mean,
        "atc_above": w.atc_above,
        "model_known": True,
        "payload": w.model_dump_json(exclude_none=True),
        "received_at": w.end + 0.125,
    }


def _old_rows() -> dict[str, list[dict[str, Any]]]:
    """A few rows of every table of the old schema, as that release wrote them (NULLs, bytes, JSON text,
    fractional times, 64-bit sessions). Foreign keys are filled in as the parents are inserted."""
    sha, t = model_ref().sha256, 1_700_000_000.0
    other = "b" * 64
    ws = WINDOWS
    return {
        "models": [
            {"sha256": sha, "name": "efficientnet-lite0", "version": "1.0.0", "manifest": _manifest(),
             "path": "/srv/models/lite0-1.0.0", "registered_at": t - 3600.5},
            {"sha256": other, "name": "efficientnet-lite0", "version": "0.9.0", "manifest": "{}",
             "path": None, "registered_at": t - 7200.25},
        ],
        "devices": [
            {"device": "cam1", "fleet": "shop", "first_seen": ws[0].start, "last_seen": ws[1].end + 0.125,
             "last_window_end": ws[1].end, "session": 1, "state": "online", "status_ts": t - 5.5,
             "agent_version": "0.1.0", "model_name": "efficientnet-lite0", "model_version": "1.0.0",
             "model_sha256": sha, "first_model_sha256": other},
            {"device": "cam2", "fleet": "shop", "first_seen": t - 99.0, "last_seen": t - 9.0,
             "last_window_end": None, "session": 2**40 + 3, "state": "offline", "status_ts": t - 9.0,
             "agent_version": None, "model_name": None, "model_version": None, "model_sha256": None,
             "first_model_sha256": None},
        ],
        "status_history": [
            {"fleet": "shop", "device": "cam1", "session": 1, "state": "online", "ts": t - 5.5,
             "model_sha256": sha, "payload": _status("cam1", "online", 1, t - 5.5), "received_at": t - 5.25},
            {"fleet": "shop", "device": "cam2", "session": 2**40 + 3, "state": "offline", "ts": t - 9.0,
             "model_sha256": None, "payload": _status("cam2", "offline", 2**40 + 3, t - 9.0),
             "received_at": t - 8.75},
        ],
        "windows": [_window_row(0), _window_row(1)],
        "samples": [
            {"fleet": "shop", "device": "cam1", "ts": t - 1.5, "model_sha256": sha, "consent_policy": "audit",
             "sha256": "c" * 64, "content_type": "image/jpeg", "image": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
             "path": None, "provenance": '{"why":"low_confidence","seq":1}', "received_at": t - 1.25},
            {"fleet": "shop", "device": "cam2", "ts": t - 2.5, "model_sha256": None, "consent_policy": "drift",
             "sha256": "d" * 64, "content_type": "image/jpeg", "image": None,
             "path": "/srv/samples/d.jpg", "provenance": None, "received_at": t - 2.25},
        ],
        "labels": [
            {"sample": 0, "label": "cat", "source": "human", "labeller": "alice", "created_at": t + 1.5},
            {"sample": 1, "label": "dog", "source": "oracle", "labeller": None, "created_at": t + 2.5},
        ],
        "update_events": [
            {"fleet": "shop", "device": "cam1", "session": 1, "seq": 4, "ts": t - 30.5, "state": "active",
             "reason": None, "release": 7, "model_sha256": sha, "serving_sha256": sha,
             "payload": _update("cam1", 1, 4, t - 30.5, "active"), "received_at": t - 30.25},
            {"fleet": "shop", "device": "cam2", "session": 2**40 + 3, "seq": 1, "ts": t - 40.5,
             "state": "rejected", "reason": "bad signature", "release": None, "model_sha256": other,
             "serving_sha256": None, "payload": _update("cam2", 2**40 + 3, 1, t - 40.5, "rejected"),
             "received_at": t - 40.25},
        ],
        "releases": [
            {"fleet": "shop", "channel": "stable", "model": 1, "created_at": t - 7000.5, "created_by": "alice",
             "details": '{"target":"lite0-0.9.0.tar"}'},
            {"fleet": "shop", "channel": "canary", "model": 0, "created_at": t - 3000.5,
             "created_by": "trainer", "details": None},
        ],
        "rollouts": [
            {"release": 1, "fleet": "shop", "device": None, "cohort": "canary", "state": "active",
             "started_at": t - 2999.5, "updated_at": t - 10.5, "details": '{"share":0.1}'},
            {"release": 0, "fleet": "shop", "device": "cam2", "cohort": None, "state": "done",
             "started_at": t - 6999.5, "updated_at": t - 6000.5, "details": None},
        ],
        "alerts": [
            {"fleet": "shop", "device": "cam1", "kind": "drift", "severity": "warning",
             "message": "cam1 drifted", "details": '{"p":0.001}', "dedupe_key": "drift:cam1:1",
             "created_at": t - 50.5, "resolved_at": None},
            {"fleet": None, "device": None, "kind": "integrity", "severity": "critical",
             "message": "unknown model", "details": None, "dedupe_key": None, "created_at": t - 60.5,
             "resolved_at": t - 55.5},
        ],
        "reference_rebases": [
            {"fleet": "shop", "model_sha256": sha, "since": t - 500.5, "windows": 30, "created_at": t - 500.25},
        ],
        "device_references": [
            {"fleet": "shop", "device": "cam1", "model_sha256": sha, "since": t - 500.5, "windows": 30,
             "reference": '{"confidence":[0.1,0.9]}', "details": '{"differs":{"brightness":0.2}}',
             "created_at": t - 400.5},
            {"fleet": "shop", "device": "cam2", "model_sha256": sha, "since": t - 500.5, "windows": 30,
             "reference": "{}", "details": None, "created_at": t - 400.25},
        ],
        "audit_log": [
            {"ts": t - 3000.5, "actor": "alice", "action": "release.publish", "subject": "release/2",
             "details": '{"channel":"canary"}'},
            {"ts": t - 10.5, "actor": "trainer", "action": "rollout.start", "subject": "rollout/1",
             "details": None},
        ],
        "dead_letters": [
            {"topic": "ef/v1/shop/tele/cam9", "payload": b"\x00not json\xff", "payload_size": 10,
             "payload_sha256": "e" * 64, "reason": "not_json", "detail": "Expecting value", "count": 3,
             "first_received_at": t - 90.5, "last_received_at": t - 80.5},
        ],
    }  # fmt: skip


def _key(table: Any) -> Any:
    return list(table.primary_key.columns)


def _fill_old_database(url: str) -> dict[str, list[dict[str, Any]]]:
    """Create the 3ff547b schema as that release did (``create_all``), fill it, and return every row as
    the database holds it (with the ids it assigned)."""
    rows = _old_rows()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            old.Base.metadata.create_all(conn)
            ids: dict[str, list[int]] = {}
            parents = {"labels": ("sample", "sample_id", "samples"), "releases": ("model", "model_sha256", "models"),
                       "rollouts": ("release", "release_id", "releases")}  # fmt: skip
            for table in old.Base.metadata.sorted_tables:
                ids[table.name] = []
                for row in rows[table.name]:
                    if table.name in parents:
                        ref, column, parent = parents[table.name]
                        row[column] = ids[parent][row.pop(ref)]
                    pk = _key(table)[0]
                    ids[table.name].append(conn.execute(sa_insert(table).returning(pk), row).scalar_one())
        return _read_old_tables(engine)
    finally:
        engine.dispose()


def _read_old_tables(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of the old schema, through the old models' columns, in key order."""
    with engine.connect() as conn:
        return {
            t.name: [dict(r._mapping) for r in conn.execute(select(t).order_by(*_key(t)))]
            for t in old.Base.metadata.sorted_tables
        }


def _version(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return []
            return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def _with_conn(url: str, fn: Any) -> Any:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            return fn(conn)
    finally:
        engine.dispose()


def _migrate_to(url: str, revision: str) -> None:
    """Upgrade (or downgrade) with Alembic's own command to any revision (no CLI goes below head)."""
    from alembic import command

    def run(conn: Connection) -> None:
        target = revision
        current = migrate.recorded_revision(conn)
        go = command.downgrade if current is not None and current > revision else command.upgrade
        go(migrate.alembic_config(conn), target)

    _with_conn(url, run)


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- (a) + (b): an old database with data, upgraded by the real command, twice -----------------------
def test_an_old_database_is_upgraded_by_the_cli_and_loses_nothing(db_url: str, tmp_path: Path) -> None:
    before = _fill_old_database(db_url)
    assert all(len(rows) >= 1 for rows in before.values()) and len(before) == 14
    expected = _old_rows()
    assert before["samples"][0]["image"] == expected["samples"][0]["image"]  # bytes as written
    assert before["devices"][1]["session"] == 2**40 + 3

    up = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == (
        f"{_shown(db_url)}: recognised revision 0001 (a database from before migrations), recorded it, "
        f"then upgraded it to {HEAD}"
    )
    assert _version(db_url) == [HEAD]
    engine = make_engine(db_url)
    try:
        assert _read_old_tables(engine) == before  # every row, every value
        with engine.connect() as conn:
            assert migrate.schema_diff(conn) == []  # (e) exactly today's models
            new_cols = conn.execute(text("SELECT status_session, status_connection FROM devices")).all()
            assert new_cols == [(None, None), (None, None)]
    finally:
        engine.dispose()

    again = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)  # (b) a no-op
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.strip()
        == f"{_shown(db_url)}: already at revision {HEAD} (this release's): nothing to do"
    )
    assert _version(db_url) == [HEAD]

    with Store(db_url) as store:  # today's store reads the old rows and writes new ones
        assert {d: s.state for d, s in store.latest_status().items()} == {"cam1": "online", "cam2": "offline"}
        assert store.add_windows([WINDOWS[2]]).stored == 1
        assert store.windows(device="cam1") == WINDOWS  # two old payloads round-trip, plus the new one
        assert store.device("cam1").last_window_end == WINDOWS[2].end  # type: ignore[union-attr]
        back = Status(fleet="shop", device="cam2", state="online", session=2**40 + 4, ts=2e9, connection=1)
        store.add_statuses([back.model_copy(update={"model": model_ref()})])
        assert store.latest_status()["cam2"].state == "online"  # ordered by the new status columns
        assert store.device("cam2").status_connection == 1  # type: ignore[union-attr]
        assert [d.count for d in store.dead_letters()] == [3]
        assert [r.state for r in store.rollouts("shop")] == ["active", "done"]
    engine = make_engine(db_url)
    try:
        after = _read_old_tables(engine)
        assert after["samples"] == before["samples"] and after["dead_letters"] == before["dead_letters"]
    finally:
        engine.dispose()


def test_an_empty_database_is_created_by_the_migrations_and_upgrading_again_does_nothing(
    db_url: str, tmp_path: Path
) -> None:
    if db_url.startswith("sqlite"):
        Path(db_url.removeprefix("sqlite:///")).touch()  # an empty database file
    first = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{_shown(db_url)}: created the schema at revision {HEAD}"
    assert _with_conn(db_url, migrate.schema_diff) == []  # (e) the revisions add up to the models
    second = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    current = _edgefleet("db", "current", "--db", db_url, cwd=tmp_path)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == f"{_shown(db_url)}: revision {HEAD}; this release's"


# -- (c): the long-running commands refuse an older schema -----------------------------------------
def _trainer_yaml(tmp_path: Path, db_url: str) -> Path:
    p = tmp_path / "trainer.yaml"
    p.write_text(
        f"fleet: shop\nmqtt: {{url: 'mqtt://127.0.0.1:1'}}\ndb_url: '{db_url}'\n"
        "release: {repo: releases}\ntraining: {base_data: builtin:shapes}\n"
    )
    return p


@pytest.mark.parametrize("command", ["trainer serve", "console", "ingest run", "labels import"])
def test_commands_refuse_a_database_older_than_this_release(
    db_url: str, tmp_path: Path, command: str
) -> None:
    before = _fill_old_database(db_url)
    cfg = _trainer_yaml(tmp_path, db_url)
    args = {
        "trainer serve": ["trainer", "serve", "--config", str(cfg)],
        "console": ["console", "--config", str(cfg)],
        "ingest run": ["ingest", "run", "--broker", "mqtt://127.0.0.1:1", "--db", db_url, "--fleet", "shop"],
        # commands that open an existing store without creating one refuse it the same way
        "labels import": ["labels", "import", "none.csv", "--db", db_url, "--package", "none"],
    }[command]
    run = _edgefleet(*args, cwd=tmp_path)
    url = _shown(db_url)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.splitlines() == [
        f"edgefleet: error: {url}: the database schema is at revision 0001 (not recorded: the database "
        f"predates migrations), this release needs {HEAD}: run `edgefleet db upgrade --db {url}`"
    ]
    assert _version(db_url) == []  # nothing recorded, nothing migrated
    engine = make_engine(db_url)
    try:
        assert _read_old_tables(engine) == before
        assert set(inspect(engine).get_table_names()) == set(old.Base.metadata.tables)
    finally:
        engine.dispose()
    assert not (tmp_path / "releases").exists()  # refused before the service set anything up


def test_a_recorded_older_revision_is_refused_and_shown(db_url: str, tmp_path: Path) -> None:
    _migrate_to(db_url, "0001")
    assert _version(db_url) == ["0001"]
    with pytest.raises(SchemaOutdated) as refused:
        Store(db_url)
    url = _shown(db_url)
    assert (refused.value.current, refused.value.head) == ("0001", HEAD)
    assert str(refused.value) == (
        f"{url}: the database schema is at revision 0001, this release needs {HEAD}: "
        f"run `edgefleet db upgrade --db {url}`"
    )
    current = _edgefleet("db", "current", "--db", db_url, cwd=tmp_path)
    assert current.returncode == 1
    assert current.stdout.strip() == (
        f"{url}: revision 0001; this release needs {HEAD}: run `edgefleet db upgrade --db {url}`"
    )
    cfg = _trainer_yaml(tmp_path, db_url)
    up = _edgefleet("db", "upgrade", "--config", str(cfg), cwd=tmp_path)  # the service's own config
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"{url}: upgraded from revision 0001 to {HEAD}"
    Store(db_url).close()


# -- (d): stores the project creates itself need no step -------------------------------------------
def test_a_fresh_store_records_head_and_reopens_without_writing(db_url: str) -> None:
    with Store(db_url) as store:
        with store.engine.connect() as conn:
            assert migrate.recorded_revision(conn) == HEAD
            assert migrate.schema_diff(conn) == []  # create_all + stamp is the same schema as migrating
        store.add_windows(WINDOWS[:1])
    statements: list[str] = []
    store = Store(db_url, create=False)
    from sqlalchemy import event

    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    store.create_schema()
    store.close()
    assert any("alembic_version" in s for s in statements)
    assert not any(s.lstrip().upper().startswith(("CREATE", "ALTER", "INSERT", "UPDATE")) for s in statements)


@pytest.mark.parametrize("by", ["store", "upgrade"])
def test_a_database_created_before_migrations_at_todays_schema_is_recorded(
    db_url: str, tmp_path: Path, by: str
) -> None:
    """A database the development versions before migrations made with today's ``create_all`` is at head
    already: opening it with a store, or ``db upgrade``, records head and changes nothing else."""
    _with_conn(db_url, Base.metadata.create_all)
    current = _edgefleet("db", "current", "--db", db_url, cwd=tmp_path)
    assert current.returncode == 0
    assert current.stdout.strip() == (
        f"{_shown(db_url)}: revision {HEAD}, recognised from its tables (a database from before "
        "migrations); this release's"
    )
    if by == "upgrade":
        up = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == (
            f"{_shown(db_url)}: recognised revision {HEAD} (a database from before migrations), recorded it"
        )
        assert "migrating" not in up.stderr
    with Store(db_url) as store:
        store.add_windows(WINDOWS[:1])
    assert _version(db_url) == [HEAD]
    assert _with_conn(db_url, migrate.schema_diff) == []


def test_tables_matching_no_revision_are_named_and_left_alone(db_url: str, tmp_path: Path) -> None:
    _fill_old_database(db_url)
    _with_conn(db_url, lambda c: c.execute(text("DROP TABLE dead_letters")))
    with pytest.raises(StoreError, match=r"match neither revision 0001 .* no table dead_letters"):
        Store(db_url)
    up = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
    assert up.returncode == 2
    assert len(up.stderr.splitlines()) == 1 and "no table dead_letters" in up.stderr
    assert _version(db_url) == []


def test_a_newer_release_s_revision_is_refused(db_url: str) -> None:
    Store(db_url).close()
    _with_conn(db_url, lambda c: c.execute(text("UPDATE alembic_version SET version_num = '0099'")))
    with pytest.raises(StoreError, match=r"revision 0099, which this release does not know"):
        Store(db_url)


def test_a_failed_upgrade_is_rolled_back(db_url: str, tmp_path: Path) -> None:
    """An upgrade is one transaction: when a step fails, the steps before it are undone too."""
    _migrate_to(db_url, "0001")
    _with_conn(db_url, lambda c: c.execute(text("CREATE TABLE rollup_cursors (x INTEGER)")))
    up = _edgefleet("db", "upgrade", "--db", db_url, cwd=tmp_path)
    assert up.returncode == 2
    errors = [line for line in up.stderr.splitlines() if line.startswith("edgefleet: error:")]
    assert len(errors) == 1 and errors == up.stderr.splitlines()[-1:]  # after the log of what it tried
    assert "the upgrade failed and was rolled back (nothing changed)" in errors[0]
    assert "rollup_cursors" in errors[0]
    assert _version(db_url) == ["0001"]
    engine = make_engine(db_url)
    try:
        insp = inspect(engine)
        assert "status_session" not in {c["name"] for c in insp.get_columns("devices")}  # step 1 undone
        assert not insp.has_table("removed_devices")
    finally:
        engine.dispose()


# -- the revisions themselves ------------------------------------------------------------------------
def test_revision_0001_is_the_released_schema_and_downgrades_back_to_it(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def diff_with_old(conn: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), old.Base.metadata))

    _migrate_to(db_url, "0001")
    assert _with_conn(db_url, diff_with_old) == []
    _migrate_to(db_url, HEAD)
    assert _with_conn(db_url, migrate.schema_diff) == []
    _migrate_to(db_url, "0001")
    assert _with_conn(db_url, diff_with_old) == []
    assert _version(db_url) == ["0001"]


def test_the_migration_environment_is_in_the_package_data() -> None:
    """env.py, the template and every revision are read as files by Alembic: each must match a
    package-data pattern of pyproject.toml, or an installed wheel could not migrate."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [
        p.relative_to(ROOT / "trainer").as_posix() for p in (ROOT / "trainer/store/migrations").rglob("*")
    ]
    files = [f for f in files if "__pycache__" not in f and "." in f.rsplit("/", 1)[-1]]
    assert "store/migrations/env.py" in files and len(files) >= 5
    missing = [f for f in files if not any(fnmatch(f, p) for p in patterns["trainer"])]
    assert missing == []
    assert migrate.script_directory().get_revision(HEAD).down_revision == "0001"
