"""Why LiteRT int8 is barely faster than fp32 on an AVX2-only CPU (issue 9): int8 over fp32, side by side.

    python -m bench.litert_avx2                    # bench/results/litert_avx2.json and a table
    python -m bench.litert_avx2 --repeats 1 --seconds 1 --no-profile --no-128   # a quick look

A second machine (AMD EPYC, AVX2 only) measured TFLite int8 at 1.03x and ONNX int8 at 1.31x their fp32
on the pretrained EfficientNet-Lite0 (224 px). This bench measures, in one run, ms per frame and the
int8/fp32 ratio of TFLite and ONNX Runtime on this CPU's kernels (``native``) and on the kernels of a
CPU without AVX-512/VNNI (``avx2``: a child under ``build/cpuid_mask.so``, see
:mod:`trainer.export.kernel_paths`), with 1 and 2 threads, for

* the pretrained package (``build/models/lite0``, exported once and reused) with its shipped int8
  artifacts (their float prefix in model.json) and ``tflite-int8-f0``: the same TFLite int8 with no float
  prefix (the export's own 0% variant, remade with :func:`trainer.export.tflite._quantize_with`), which
  separates the float prefix's cost from the int8 kernels' speed;
* optionally the demo's 128-px retrained package (:func:`bench.int8_bench._retrained`, seed 1).

Each child times every artifact interleaved (:func:`edge_agent.backends.select.time_artifacts`, the
agent's own timing); the children alternate native / avx2 for ``--repeats`` rounds and the medians over
rounds are reported. Which kernels run: every TFLite file's op counts (QUANTIZE/DEQUANTIZE, convolutions
left in float), the XNNPACK delegate's partitions on each kernel path, and, where ``perf`` works, a
sampled profile of each TFLite artifact (one thread) naming the XNNPACK micro-kernels that take the time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy_bench import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "litert_avx2.json"
PACKAGE = ROOT / "build" / "models" / "lite0"
WORK = ROOT / "build" / "litert_avx2"
FULL_INT8 = "tflite-int8-f0"
NATIVE, AVX2 = "native", "avx2"


# --- the packages and the fully-int8 variant ---------------------------------------------------------


def _pretrained() -> Any:
    """The pretrained Lite0 package (224 px), exported into build/models/lite0 unless it is there."""
    from edge_agent.package import load_package
    from trainer.sim.demo_photos import ensure_package

    return load_package(ensure_package(PACKAGE))


def _retrained_128() -> Any:
    """The demo-sized (128 px) retrained package of bench.int8_bench (seed 1), trained once and reused."""
    from bench.int8_bench import _retrained
    from edge_agent.package import load_package

    out = WORK / "retrained-1"
    with contextlib.suppress(Exception):
        return load_package(out)
    shutil.rmtree(out, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    return _retrained(1, WORK)[0]


def _calibration_nhwc(pkg: Any) -> np.ndarray:
    """The pretrained export's calibration frames (128 crops, seed 0: export_pretrained's defaults), NHWC."""
    from trainer.data.photos import camera_frames, load_photos
    from trainer.export.package import _float_nchw

    nchw = _float_nchw(camera_frames(load_photos(), 128, 0), pkg.manifest.preprocess)
    return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))


def _full_int8(pkg: Any) -> Path:
    """TFLite int8 of the package's fp32 with no float prefix (the export's 0% variant), made once."""
    from trainer.export.tflite import _calibrate, _quantize_with

    out = WORK / f"{pkg.manifest.name}-{pkg.sha256[:12]}-int8-f0.tflite"
    if not out.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        fp32 = pkg.artifact_path("tflite-fp32")
        ranges = _calibrate(fp32, _calibration_nhwc(pkg), pkg.manifest.preprocess)
        _quantize_with(fp32, out, ranges, [])
    return out


def _with_extra(pkg: Any, extra: dict[str, Path]) -> Path:
    """model.json of ``pkg`` plus the ``extra`` TFLite int8 files as artifacts, written for the children."""
    from edge_agent.package import Artifact, FileEntry, sha256_file
    from trainer.export.tflite import tflite_tensor_specs

    m = pkg.manifest
    arts, files = dict(m.artifacts), dict(m.files)
    for key, path in extra.items():
        spec_in, spec_out = tflite_tensor_specs(path)
        arts[key] = Artifact(
            file=str(path),
            runtime="litert",
            precision="int8",
            input=spec_in,
            output=spec_out,
            quantization={"float_prefix": "none: every convolution int8"},
        )
        files[str(path)] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    out = WORK / f"{m.name}-{pkg.sha256[:12]}.manifest.json"
    out.write_text(m.model_copy(update={"artifacts": arts, "files": files}).model_dump_json())
    return out


def _load(root: str, manifest: str | None) -> Any:
    """The package at ``root``, with the manifest the parent wrote (extra artifacts) if given."""
    from edge_agent.package import ModelManifest, ModelPackage, load_package

    pkg = load_package(root, verify=False)  # the parent verified it
    if manifest:
        pkg = ModelPackage(
            pkg.root, ModelManifest.model_validate_json(Path(manifest).read_text()), pkg.sha256
        )
    return pkg


# --- what a TFLite file holds and what XNNPACK takes of it ----------------------------------------------


def tflite_ops(path: Path) -> dict[str, Any]:
    """Op counts of a TFLite file, and how many convolutions/adds take float input (the float prefix)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    ops = interp._get_ops_details()
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    heavy = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "FULLY_CONNECTED", "MEAN")
    by_dtype = Counter(
        f"{o['op_name']} {dtypes.get(o['inputs'][0], '?')}" for o in ops if o["op_name"] in heavy
    )
    return {
        "ops": len(ops),
        "op_counts": dict(Counter(o["op_name"] for o in ops)),
        "by_input_dtype": dict(sorted(by_dtype.items())),
        "input_dtype": np.dtype(interp.get_input_details()[0]["dtype"]).name,
    }


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Redirect file descriptor 2 (the runtime's C++ log) into ``path`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def delegation(path: Path, threads: int) -> dict[str, Any]:
    """The XNNPACK delegate's hold on a TFLite file as the agent loads it: DELEGATE nodes, whether one
    partition spans input to output (no op left to the builtin kernels), and the runtime's log lines."""
    from ai_edge_litert.interpreter import Interpreter

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "log")
        with _stderr_to(log):
            interp = Interpreter(model_path=str(path), num_threads=threads)
            interp.allocate_tensors()
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    ops = interp._get_ops_details()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    return {
        "delegate_nodes": len(delegates),
        "model_ops": len(ops) - len(delegates),
        "one_partition_input_to_output": len(delegates) == 1
        and inp in list(delegates[0]["inputs"])
        and out in list(delegates[0]["outputs"]),
        "log": lines[:5],
    }


# --- the children: timing, delegation, a spin for perf ------------------------------------------------


def _child(a: argparse.Namespace) -> int:
    """One child (native or under the mask): the delegation (first, so the runtime's log is seen), then
    interleaved timing per thread count."""
    from edge_agent.backends import BackendOptions
    from edge_agent.backends.select import time_artifacts

    pkg = _load(a.package, a.manifest)
    out: dict[str, Any] = {"cpu_flags": cpu_flags(), "loadavg": _loadavg(), "threads": {}}
    if a.inspect:
        out["delegation"] = {
            key: delegation(pkg.artifact_path(key), 1)
            for key, art in pkg.manifest.artifacts.items()
            if art.runtime == "litert"
        }
    for t in a.threads:
        out["threads"][str(t)] = time_artifacts(pkg, BackendOptions(threads=t), a.seconds, rounds=a.rounds)
    Path(a.child).write_text(json.dumps(out))
    return 0


def _spin(path: str, seconds: float) -> int:
    """Run one TFLite file on one thread for ``seconds`` (the process ``perf`` samples)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=1)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        interp.invoke()
    return 0


def _loadavg() -> list[float]:
    """The 1/5/15-minute load averages (how loaded the machine was)."""
    with contextlib.suppress(OSError):
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def _run_child(lib: Path | None, argv: list[str]) -> None:
    """``python argv`` from the checkout: under the mask (the AVX2 kernels) if ``lib``, else plainly."""
    from trainer.export.kernel_paths import run_on_avx2_kernels

    if lib is not None:
        run_on_avx2_kernels(lib, argv, timeout=1800)
    else:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(argv[:4])} failed (rc {done.returncode}): {tail}")


def _one_run(
    pkg: Any, manifest: Path, lib: Path | None, a: argparse.Namespace, inspect: bool
) -> dict[str, Any]:
    """One child's timings (native if ``lib`` is None, else the AVX2 kernels)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["-m", "bench.litert_avx2", "--child", f"{tmp}/r.json", "--package", str(pkg.root)]
        argv += ["--manifest", str(manifest), "--seconds", str(a.seconds), "--rounds", str(a.rounds)]
        argv += ["--threads", ",".join(map(str, a.threads))] + (["--inspect"] if inspect else [])
        _run_child(lib, argv)
        return dict(json.loads(Path(tmp, "r.json").read_text()))


def _kernel_paths() -> dict[str, Path | None]:
    """native -> None, and avx2 -> the masking library where this CPU can fault on CPUID."""
    from trainer.export.kernel_paths import avx2_mask_library

    lib = avx2_mask_library()
    return {NATIVE: None, **({AVX2: lib} if lib is not None else {})}


def measure(pkg: Any, manifest: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """``a.repeats`` rounds, each a native child then an AVX2 child (alternating, so a neighbour's load
    falls on both), every child timing all artifacts interleaved at each thread count."""
    runs = []
    for rep in range(a.repeats):
        for kernels, lib in _kernel_paths().items():
            t0 = time.time()
            run = _one_run(pkg, manifest, lib, a, inspect=rep == 0)
            runs.append({"rep": rep, "kernels": kernels, "wall_s": round(time.time() - t0, 1), **run})
            print(f"  round {rep + 1}/{a.repeats} {kernels}: {_brief(run)}", flush=True)
    return runs


def _brief(run: dict[str, Any]) -> str:
    return "; ".join(
        f"{t} thr " + " ".join(f"{k} {v}" for k, v in ms.items() if isinstance(v, float))
        for t, ms in run["threads"].items()
    )


# --- perf: which micro-kernels take the time -------------------------------------------------------------


def profile(path: Path, lib: Path | None, seconds: float) -> dict[str, Any] | str:
    """Sampled profile (perf, user space) of one TFLite file on one thread: the share of the LiteRT
    library's samples per symbol (XNNPACK micro-kernels are named by ISA), or why it could not run."""
    if shutil.which("perf") is None:
        return "perf not installed"
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        env = ["env", f"LD_PRELOAD={lib}"] if lib is not None else []
        spin = [sys.executable, "-m", "bench.litert_avx2", "--spin", str(path), "--seconds", str(seconds)]
        rec = ["perf", "record", "-q", "-e", "cpu-clock:u", "-F", "999", "-o", data, "--", *env, *spin]
        done = subprocess.run(rec, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"perf record failed: {done.stderr.strip()[-300:]}"
        rep = ["perf", "report", "-i", data, "--stdio", "--sort", "dso,symbol", "--percent-limit", "0.2"]
        report = subprocess.run(rep, capture_output=True, text=True, timeout=600).stdout
    return _kernel_shares(report)


def _kernel_shares(report: str) -> dict[str, Any]:
    """Per symbol of the LiteRT library, its share of that library's samples; and the library's share."""
    rows = re.findall(r"^\s*([\d.]+)%\s+(\S+)\s+\[\.\]\s+(\S+)", report, flags=re.M)
    lib = [(float(p), sym) for p, dso, sym in rows if "litert" in dso]
    total = sum(p for p, _ in lib)
    if not total:
        return {"litert_share_of_samples": 0.0, "classes": {}, "symbols": {}}
    shares = {sym: round(p / total, 3) for p, sym in sorted(lib, reverse=True) if p / total >= 0.01}
    classes: dict[str, float] = {}
    for p, sym in lib:
        classes[kernel_class(sym)] = classes.get(kernel_class(sym), 0.0) + p / total
    return {
        "litert_share_of_samples": round(total / 100, 3),
        "xnnpack_share": round(sum(p for p, s in lib if s.startswith("xnn_")) / total, 3),
        "classes": {c: round(v, 3) for c, v in sorted(classes.items(), key=lambda cv: -cv[1])},
        "symbols": shares,
    }


def kernel_class(symbol: str) -> str:
    """``<datatype> <operation>`` of an XNNPACK micro-kernel (``qs8 gemm``, ``f32 dwconv``; ``f32 vcvt``
    is QUANTIZE, ``qs8 vcvt`` DEQUANTIZE), or ``not xnnpack`` (a builtin TFLite kernel, the runtime)."""
    if not symbol.startswith("xnn_"):
        return "not xnnpack"
    dtype = symbol.split("_")[1]
    if dtype not in ("f32", "f16", "qs8", "qu8", "qd8", "x8", "x32", "s8", "u8"):
        return "xnnpack other"  # operator-level dispatch (xnn_compute_*), setup, packing
    for op in ("gemm", "dwconv", "vcvt", "vadd", "vmul", "rsum", "gavgpool", "vunary", "pack"):
        if op in symbol:
            return f"{dtype} {op}"
    return "xnnpack other"


def kernel_ms(prof: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
    """Per kernel path and TFLite artifact, its one-thread ms per frame split by :func:`kernel_class` in
    proportion to the profile's samples (startup and weight packing are in the samples too, so rough)."""
    out: dict[str, Any] = {}
    for kernels, arts in (prof or {}).items():
        for key, p in arts.items():
            ms = summary.get(kernels, {}).get("1", {}).get(key, {}).get("ms_median")
            if isinstance(p, dict) and isinstance(ms, float):
                out.setdefault(kernels, {})[key] = {c: round(v * ms, 3) for c, v in p["classes"].items()}
    return out


def profiles(pkg: Any, extra: dict[str, Path], seconds: float) -> dict[str, dict[str, Any]]:
    """:func:`profile` of each TFLite artifact on each kernel path."""
    paths = {k: pkg.artifact_path(k) for k, art in pkg.manifest.artifacts.items() if art.runtime == "litert"}
    paths.update(extra)
    return {
        kernels: {k: profile(p, lib, seconds) for k, p in paths.items()}
        for kernels, lib in _kernel_paths().items()
    }


# --- summary, table, main ---------------------------------------------------------------------------------


def _fp32_of(key: str) -> str:
    return key.split("-int8")[0] + "-fp32"


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """kernels -> threads -> artifact -> ms of every round, their median, and int8 over the same runtime's
    fp32 (per round, from the same child's interleaved timing; median over rounds)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for run in runs:
        for t, ms in run["threads"].items():
            for key, v in ms.items():
                row = (
                    out.setdefault(run["kernels"], {}).setdefault(t, {}).setdefault(key, {"ms": [], "x": []})
                )
                row["ms"].append(v)
                fp32 = ms.get(_fp32_of(key))
                if isinstance(v, float) and isinstance(fp32, float):
                    row["x"].append(round(fp32 / v, 3))
    for row in (r for per_t in out.values() for arts in per_t.values() for r in arts.values()):
        nums = [v for v in row["ms"] if isinstance(v, float)]
        row["ms_median"] = round(float(np.median(nums)), 3) if nums else None
        row["x_fp32_median"] = round(float(np.median(row["x"])), 2) if row["x"] else None
    return out


def table(result: dict[str, Any]) -> str:
    """ms per frame (x fp32) per package, artifact, kernel path and thread count."""
    lines = [f"CPU flags: {' '.join(result['machine']['cpu_flags'])}; load {result['machine']['loadavg']}"]
    for name, p in result["packages"].items():
        cols = [(k, t) for k, per_t in p["summary"].items() for t in per_t]
        lines.append(
            f"\n{name} ({p['input_size']} px)   " + "".join(f"{k + ' ' + t + ' thr':>18s}" for k, t in cols)
        )
        for key in next(iter(p["summary"].values()))[cols[0][1]]:
            cells = []
            for k, t in cols:
                r = p["summary"][k][t].get(key, {})
                ms, x = r.get("ms_median"), r.get("x_fp32_median")
                cells.append(f"{ms:8.2f} ms ({x:.2f}x)" if ms and x else f"{ms:8.2f} ms" if ms else "-")
            lines.append(f"  {key:22s}" + "".join(f"{c:>18s}" for c in cells))
        lines += _profile_lines(p.get("profile") or {}, p.get("kernel_ms_1thread") or {})
    return "\n".join(lines)


def _profile_lines(prof: dict[str, dict[str, Any]], split: dict[str, dict[str, Any]]) -> list[str]:
    """The top micro-kernels of each profile, and the one-thread ms split by kernel class."""
    lines = []
    for kernels, arts in prof.items():
        for key, p in arts.items():
            if isinstance(p, str):
                lines.append(f"  perf {kernels} {key}: {p}")
                continue
            top = ", ".join(f"{s} {v:.0%}" for s, v in list(p["symbols"].items())[:4])
            ms = ", ".join(
                f"{c} {v:.2f}" for c, v in split.get(kernels, {}).get(key, {}).items() if v >= 0.05
            )
            lines += [f"  perf {kernels:6s} {key:16s} {top}", f"       {'':6s} {'':16s} ms: {ms}"]
    return lines


def bench_package(name: str, pkg: Any, extra: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    """Everything measured for one package."""
    print(f"{name}: {pkg.root}", flush=True)
    manifest = _with_extra(pkg, extra)
    runs = measure(pkg, manifest, a)
    litert = {k: pkg.artifact_path(k) for k, art in pkg.manifest.artifacts.items() if art.runtime == "litert"}
    result = {
        "root": str(pkg.root),
        "sha256": pkg.sha256,
        "input_size": list(pkg.manifest.preprocess.size),
        "float_prefix": {
            k: (art.quantization or {}).get("float_prefix") for k, art in pkg.manifest.artifacts.items()
        },
        "extra_artifacts": {k: str(p) for k, p in extra.items()},
        "tflite_ops": {k: tflite_ops(p) for k, p in {**litert, **extra}.items()},
        "summary": summarize(runs),
        "runs": runs,
        "profile": profiles(pkg, extra, a.profile_seconds) if a.profile_seconds > 0 else None,
    }
    result["kernel_ms_1thread"] = kernel_ms(result["profile"], result["summary"])
    return result


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Both packages (the 128-px one unless ``--no-128``), with the machine's flags and load."""
    result: dict[str, Any] = {
        "command": "python -m bench.litert_avx2 " + " ".join(a.argv),
        "machine": {"cpu_flags": cpu_flags(), "processor": platform.processor(), "loadavg": _loadavg()},
        "settings": {
            k: getattr(a, k) for k in ("seconds", "rounds", "repeats", "threads", "profile_seconds")
        },
        "kernel_paths": list(_kernel_paths()),
        "packages": {},
    }
    pkg = _pretrained()
    result["packages"]["pretrained"] = bench_package("pretrained", pkg, {FULL_INT8: _full_int8(pkg)}, a)
    if a.with_128:  # optional: a failure here is recorded, not allowed to lose the pretrained figures
        try:
            result["packages"]["retrained-128"] = bench_package("retrained-128", _retrained_128(), {}, a)
        except Exception as exc:  # noqa: BLE001
            result["retrained-128 error"] = f"{type(exc).__name__}: {exc}"
    result["machine"]["loadavg_end"] = _loadavg()
    return result


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per child and thread count")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds within a child")
    ap.add_argument("--repeats", type=int, default=5, help="native/avx2 child pairs (medians over them)")
    ap.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    ap.add_argument("--profile-seconds", type=float, default=4.0, help="perf per artifact; 0: none")
    ap.add_argument("--no-profile", dest="profile_seconds", action="store_const", const=0.0)
    ap.add_argument("--no-128", dest="with_128", action="store_false", help="skip the 128-px package")
    for hidden in ("--child", "--package", "--manifest", "--spin"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--inspect", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    return a


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.child:
        return _child(a)
    if a.spin:
        return _spin(a.spin, a.seconds)
    result = run(a)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
