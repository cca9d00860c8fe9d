"""deploy/postgres/roles.sql as shipped: the owner role migrates, the application role runs the services'
reads and writes (ingest, roll-ups and retention, alerts, the console's queries) and cannot change the schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from tests.conftest import PG_SERVER, _pg_admin_url, require
from trainer.sim.windows import windows
from trainer.store import Store
from trainer.store.fleet_state import device_rows
from trainer.store.rollups import purge_windows, roll_up

ROLES_SQL = Path(__file__).resolve().parents[1] / "deploy" / "postgres" / "roles.sql"


@pytest.fixture
def roles() -> Iterator[dict[str, str]]:
    """roles.sql run by psql with unique role and database names; URLs of the owner and the app role."""
    require(_pg_admin_url() is not None, f"PostgreSQL at {PG_SERVER}")
    psql = shutil.which("psql")
    require(psql is not None, "the psql client")
    assert psql is not None
    tag = uuid.uuid4().hex[:8]
    names = {"owner": f"ef_owner_{tag}", "app": f"ef_app_{tag}", "db": f"ef_roles_{tag}"}
    sql = (
        ROLES_SQL.read_text()
        .replace("edgefleet_owner", names["owner"])
        .replace("edgefleet_app", names["app"])
        .replace("DATABASE edgefleet OWNER", f"DATABASE {names['db']} OWNER")
        .replace("\\connect edgefleet", f"\\connect {names['db']}")
    )
    admin = make_url(PG_SERVER)
    conninfo = ["-h", str(admin.host), "-p", str(admin.port or 5432), "-U", str(admin.username)]
    run = subprocess.run(
        [psql, *conninfo, "-d", str(admin.database), "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr

    def url(role: str) -> str:
        return admin.set(username=role, database=names["db"]).render_as_string(hide_password=False)

    yield {"owner": url(names["owner"]), "app": url(names["app"])}
    cleanup = [
        f"DROP DATABASE IF EXISTS {names['db']} WITH (FORCE)",
        f"DROP ROLE IF EXISTS {names['app']}",
        f"DROP ROLE IF EXISTS {names['owner']}",
    ]  # one -c each: DROP DATABASE cannot run in the transaction of a multi-statement -c
    for statement in cleanup:
        subprocess.run(
            [psql, *conninfo, "-d", str(admin.database), "-q", "-c", statement], timeout=60, check=False
        )


def _edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_owner_migrates_and_the_services_role_reads_and_writes_rows_only(roles: dict[str, str]) -> None:
    up = _edgefleet("db", "upgrade", "--db", roles["owner"])
    assert up.returncode == 0, up.stderr
    with Store(roles["app"], create=False) as store:  # at head: opening it writes nothing
        ws = windows("cam1", 30, fleet="shop", start=time.time() - 3 * 86400, window_s=3600.0)
        assert store.add_windows(ws).stored == 30
        store.record_alert(kind="drift", message="cam1 drifted", device="cam1", fleet="shop")
        rolled = roll_up(store, until=time.time())  # takes a SHARE lock on windows: needs UPDATE/DELETE
        assert rolled["hour"] > 0, rolled
        assert purge_windows(store, keep_days=1, now=time.time()) > 0
        assert [device.device for device, _ in device_rows(store, "shop")] == ["cam1"]
        with pytest.raises(ProgrammingError, match="must be owner|permission denied"), store.write() as conn:
            conn.execute(text("DROP TABLE windows"))
        with pytest.raises(ProgrammingError, match="permission denied"), store.write() as conn:
            conn.execute(text("CREATE TABLE intruder (id integer)"))
    # a second upgrade as the owner is a no-op
    again = _edgefleet("db", "upgrade", "--db", roles["owner"])
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
