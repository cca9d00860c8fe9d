"""Every parser that takes outside input, fuzzed: a short seeded pass here, atheris in ``make bench``.

Each target (``tests/fuzz_targets.py``) may only refuse an input with its documented error. Two checks
per target: every kept input (seeds, and each crash ever found: regression inputs) still passes, and
a seeded Hypothesis run over random bytes and mutations of the seeds finds nothing new.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_targets import TARGETS, corpus

EXAMPLES = {"http_request": 60, "agent_yaml": 80, "trainer_yaml": 80, "archive": 80}
"""Fewer examples where one costs a socket or temporary files; 150 elsewhere."""


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes replaced, inserted or cut: malformed inputs close to valid ones."""
    n = len(seed)
    edits = st.lists(
        st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, 255), st.sampled_from("rid")), max_size=6
    )

    def apply(args: tuple[list[tuple[int, int, str]], int]) -> bytes:
        changes, cut = args
        b = bytearray(seed)
        for pos, value, how in changes:
            if how == "r" and pos < len(b):
                b[pos] = value
            elif how == "i":
                b.insert(pos, value)
            elif how == "d" and pos < len(b):
                del b[pos]
        return bytes(b[: cut or None])

    return st.tuples(edits, st.integers(0, n)).map(apply)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_kept_inputs_are_refused_cleanly(name: str) -> None:
    kept = corpus(name)
    assert kept, f"tests/fuzz_corpus/{name} has no seed"
    for file, data in kept:
        try:
            TARGETS[name](data)
        except Exception as exc:  # noqa: BLE001 - name the input that regressed
            raise AssertionError(f"tests/fuzz_corpus/{name}/{file}: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeded_fuzz_pass(name: str) -> None:
    seeds = [data for _, data in corpus(name)]
    inputs = st.one_of(st.binary(max_size=600), st.sampled_from(seeds).flatmap(_mutations))

    @settings(
        max_examples=EXAMPLES.get(name, 150),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def run(data: bytes) -> None:
        TARGETS[name](data)

    run()
