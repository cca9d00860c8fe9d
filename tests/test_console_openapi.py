"""A property-based run (schemathesis, hypothesis) of every operation in the console's OpenAPI
document against the app on a seeded store: whatever the inputs, no 5xx, and responses match the
document."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.console_fixtures import Seeded
from trainer.console.auth import new_token, token_hash
from trainer.sim.console_seed import seed_console
from trainer.store import Store
from trainer.store.console_users import add_token

EXAMPLES = 25


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Seeded, dict[str, str]]:
    root: Path = tmp_path_factory.mktemp("openapi")
    store = Store(f"sqlite:///{root / 'console.db'}")
    seed = seed_console(store, root / "seed", devices=6, hours=2.0, now=time.time())
    token = new_token()
    add_token(store, seed.users["admin"][0], "schemathesis", token_hash(token), actor="test")
    return Seeded(store, seed), {"Authorization": f"Bearer {token}"}


def test_every_operation_answers_without_server_errors(target: tuple[Seeded, dict[str, str]]) -> None:
    s, auth = target
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", s.app, headers=dict(auth))
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    seen: dict[str, set[int]] = {}

    for op in operations:

        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=op.as_strategy())
        def check(case: schemathesis.Case) -> None:
            resp = case.call(headers=auth)
            seen.setdefault(case.operation.label, set()).add(resp.status_code)
            assert resp.status_code < 500, (case.method, case.formatted_path, case.query, resp.text[:300])
            ctype = resp.headers.get("content-type") or [""]
            if resp.status_code < 300 and ctype[0].startswith("application/json"):
                case.validate_response(resp)  # the body matches the documented schema

        check()
    assert set(seen) == {op.label for op in operations}
    assert any(200 in codes for codes in seen.values())
