"""Decode + validation of realistic telemetry windows straight from bytes: pydantic-core vs msgspec.

Ingest validates every device message with the wire models of :mod:`edge_agent.protocol`
(``model_validate_json``, pydantic-core). msgspec is the other fast path the scale-out issue names. To
compare like with like without a hand-written second schema, :func:`msgspec_struct` *generates*
msgspec Structs from the pydantic models (types, defaults, ``extra="forbid"``, ``ge``, lengths,
patterns); what pydantic expresses in Python (model/after validators: one count per bin, increasing
edges, reserved device ids) and ``allow_inf_nan=False`` have no msgspec equivalent in the generated
schema, so :func:`agreement` measures on hostile variants where the two disagree::

    python -m bench.decode_bench            # prints the table, writes bench/results/decode.json

:func:`measure` is also called by bench/ingest_bench.py so the figures land in ingest.json.
"""

from __future__ import annotations

import json
import math
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic import BaseModel

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _meta(metadata: list[Any]) -> dict[str, Any]:
    """msgspec.Meta keyword arguments for the annotated-types / pydantic constraints it can express."""
    kw: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, at.Ge):
            kw["ge"] = m.ge
        elif isinstance(m, at.MinLen):
            kw["min_length"] = m.min_length
        elif isinstance(m, at.MaxLen):
            kw["max_length"] = m.max_length
        elif getattr(m, "pattern", None):
            kw["pattern"] = m.pattern
    return kw


def _type(tp: Any, metadata: list[Any], cache: dict[type, Any]) -> Any:
    """The msgspec type for one pydantic field annotation."""
    import msgspec

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type(args[0], [*metadata, *args[1:]], cache)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return msgspec_struct(tp, cache)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_type(a, [], cache) for a in args)]  # noqa: UP007 - built at runtime
    if origin is dict:
        return dict[_type(args[0], [], cache), _type(args[1], [], cache)]  # type: ignore[misc]
    if origin is list:
        inner = list[_type(args[0], [], cache)]  # type: ignore[misc]
        kw = _meta(metadata)
        return typing.Annotated[inner, msgspec.Meta(**kw)] if kw else inner
    kw = _meta(metadata)
    return typing.Annotated[tp, msgspec.Meta(**kw)] if kw else tp


def msgspec_struct(model: type[BaseModel], cache: dict[type, Any] | None = None) -> Any:
    """A msgspec Struct generated from a pydantic model (no second hand-written schema)."""
    import msgspec
    from pydantic_core import PydanticUndefined

    cache = {} if cache is None else cache
    if model in cache:
        return cache[model]
    fields: list[Any] = []
    for name, f in model.model_fields.items():
        tp = _type(f.annotation, list(f.metadata), cache)
        if f.is_required():
            fields.append((name, tp))
        elif f.default_factory is not None:
            fields.append((name, tp, msgspec.field(default_factory=f.default_factory)))  # type: ignore[arg-type]
        else:
            fields.append((name, tp, None if f.default is PydanticUndefined else f.default))
    required = [x for x in fields if len(x) == 2]
    optional = [x for x in fields if len(x) == 3]
    struct = msgspec.defstruct(model.__name__, [*required, *optional], forbid_unknown_fields=True)
    cache[model] = struct
    return struct


def hostile_variants(window: dict[str, Any]) -> dict[str, bytes]:
    """A valid window and named mutations of it that a validator must (or, in JSON's lax reading,
    may) refuse: the cases where the two validators could part ways."""

    def mutate(fn: Callable[[dict[str, Any]], None]) -> bytes:
        w = json.loads(json.dumps(window))
        fn(w)
        return json.dumps(w).encode()

    first = next(iter(window["histograms"]))
    out = {
        "valid": json.dumps(window).encode(),
        "not_json": b"{not json",
        "extra_field": mutate(lambda w: w.update(extra=1)),
        "missing_field": mutate(lambda w: w.pop("model")),
        "negative_seq": mutate(lambda w: w.update(seq=-1)),
        "seq_as_string": mutate(lambda w: w.update(seq="5")),
        "seq_as_float": mutate(lambda w: w.update(seq=5.0)),
        "seq_as_bool": mutate(lambda w: w.update(seq=True)),
        "start_as_string": mutate(lambda w: w.update(start="1700000000")),
        "wrong_kind": mutate(lambda w: w.update(kind="status")),
        "bad_sha": mutate(lambda w: w["model"].update(sha256="XYZ")),
        "bad_device_chars": mutate(lambda w: w.update(device="cam/1")),
        "reserved_device": mutate(lambda w: w.update(device="trainer")),
        "negative_count": mutate(lambda w: w["histograms"][first]["counts"].__setitem__(0, -1)),
        "count_per_bin": mutate(lambda w: w["histograms"][first]["counts"].append(1)),
        "edges_not_increasing": mutate(
            lambda w: w["histograms"][first]["edges"].__setitem__(1, w["histograms"][first]["edges"][0])
        ),
        "one_edge": mutate(lambda w: w["histograms"].update({first: {"edges": [0.0], "counts": []}})),
    }
    out["sha256_trailing_newline"] = mutate(lambda w: w["model"].update(sha256=w["model"]["sha256"] + "\n"))
    text = out["valid"].decode()
    out["overflow_to_inf"] = text.replace('"start": 1700000000.0', '"start": 1e400').encode()
    out["nan_literal"] = text.replace('"start": 1700000000.0', '"start": NaN').encode()
    return out


def _accepts(decode: Callable[[bytes], Any], payload: bytes) -> bool:
    try:
        decode(payload)
    except Exception:  # noqa: BLE001 - any refusal counts as a refusal
        return False
    return True


def agreement(pydantic_model: type[BaseModel], struct: Any, window: dict[str, Any]) -> dict[str, Any]:
    """Which hostile variants pydantic and the generated msgspec schema (strict, and ``strict=False``:
    msgspec's lax mode, closer to pydantic's JSON coercions) accept; where they differ. "msgspec
    accepts, pydantic refuses" is the dangerous direction: no fallback to pydantic can catch it."""
    import msgspec

    strict, lax = msgspec.json.Decoder(struct), msgspec.json.Decoder(struct, strict=False)
    rows = {}
    for name, payload in hostile_variants(window).items():
        rows[name] = {
            "pydantic": _accepts(pydantic_model.model_validate_json, payload),
            "msgspec": _accepts(strict.decode, payload),
            "msgspec_lax": _accepts(lax.decode, payload),
        }
    return {
        "variants": rows,
        "disagree": sorted(k for k, v in rows.items() if v["pydantic"] != v["msgspec"]),
        "disagree_lax": sorted(k for k, v in rows.items() if v["pydantic"] != v["msgspec_lax"]),
        "msgspec_accepts_what_pydantic_refuses": sorted(
            k for k, v in rows.items() if not v["pydantic"] and (v["msgspec"] or v["msgspec_lax"])
        ),
    }


def _per_msg(fn: Callable[[bytes], Any], payloads: list[bytes], rounds: int) -> float:
    """Best of ``rounds`` passes, CPU microseconds per payload (process time: the machine is shared)."""
    best = math.inf
    for _ in range(rounds):
        t = time.process_time()
        for p in payloads:
            fn(p)
        best = min(best, time.process_time() - t)
    return best / len(payloads) * 1e6


def measure(payloads: list[bytes], rounds: int = 5) -> dict[str, Any]:
    """Microseconds of CPU per window for each way of decoding it, and the validators' agreement
    (msgspec is a bench-only tool: without it only the pydantic rows are measured)."""
    import pydantic_core

    from edge_agent.protocol import TelemetryWindow

    rows = {
        "json.loads (stdlib, no validation)": _per_msg(json.loads, payloads, rounds),
        "pydantic_core from_json (no validation)": _per_msg(pydantic_core.from_json, payloads, rounds),
        "pydantic model_validate_json (what ingest uses)": _per_msg(
            TelemetryWindow.model_validate_json, payloads, rounds
        ),
    }
    result: dict[str, Any] = {
        "payloads": len(payloads),
        "mean_bytes": round(sum(map(len, payloads)) / len(payloads)),
        "pydantic_core_version": pydantic_core.__version__,
    }
    try:
        import msgspec
    except ImportError:
        result["msgspec_version"] = None
        result["agreement"] = {"disagree": ["msgspec not installed (pip install msgspec)"]}
    else:
        struct = msgspec_struct(TelemetryWindow)
        strict, lax = msgspec.json.Decoder(struct), msgspec.json.Decoder(struct, strict=False)
        untyped = msgspec.json.Decoder()
        rows["msgspec decode, untyped (no validation)"] = _per_msg(untyped.decode, payloads, rounds)
        rows["msgspec typed, generated schema (weaker: see agreement)"] = _per_msg(
            strict.decode, payloads, rounds
        )
        rows["msgspec typed, generated schema, strict=False"] = _per_msg(lax.decode, payloads, rounds)
        result["msgspec_version"] = msgspec.__version__
        result["agreement"] = agreement(TelemetryWindow, struct, json.loads(payloads[0]))
    result["us_per_msg"] = {k: round(v, 1) for k, v in rows.items()}
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"decode + validate, {result['payloads']} windows of ~{result['mean_bytes']} B (CPU us/msg)"]
    lines += [f"  {k:66s} {v:7.1f}" for k, v in result["us_per_msg"].items()]
    agree = result["agreement"]
    lines.append(
        f"  generated msgspec schema disagrees with pydantic on: {', '.join(agree['disagree']) or '-'}"
    )
    if "disagree_lax" in agree:
        lines.append(f"  ... with strict=False on: {', '.join(agree['disagree_lax']) or '-'}")
        lines.append(
            f"  msgspec accepts what pydantic refuses: {', '.join(agree['msgspec_accepts_what_pydantic_refuses'])}"
        )
    return "\n".join(lines)


def main() -> dict[str, Any]:
    from bench.accuracy_bench import cpu_flags
    from bench.ingest_bench import machine_block, make_payloads

    result = measure([p for _, p in make_payloads("window", 2000)])
    result["machine"] = machine_block()
    result["cpu_flags"] = cpu_flags()
    (RESULTS / "decode.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
