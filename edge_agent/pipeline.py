"""The inference pipeline: capture -> preprocess -> runtime -> probabilities, overlapped on threads.

Three threads keep the inference core busy: the source's capture thread, a preprocessing thread
(resize, normalise, input statistics) and an inference thread. The runtimes release the GIL while they
compute, so preprocessing of frame n+1 runs beside inference of frame n. Results are consumed by the
agent's main loop, which feeds telemetry.

Each work item carries the :class:`LoadedModel` it was preprocessed for, so :meth:`Pipeline.swap`
replaces the model at a frame boundary without stopping capture and without mixing a frame's
preprocessing with another model's runtime.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.backends.base import Backend, BackendOptions, load_backend
from edge_agent.package import ModelPackage
from edge_agent.postprocess import to_probabilities
from edge_agent.preprocess import FrameError, Preprocessor
from edge_agent.protocol import ModelRef
from edge_agent.sources.base import EndOfStream, FrameSource
from edge_agent.telemetry.features import InputStatistics, input_statistics

log = logging.getLogger(__name__)

_END = object()


@dataclass
class LoadedModel:
    """One model ready to serve: package, chosen artifact, its runtime session and preprocessor."""

    package: ModelPackage
    artifact: str
    backend: Backend
    preprocessor: Preprocessor

    @classmethod
    def load(cls, package: ModelPackage, artifact: str, options: BackendOptions) -> LoadedModel:
        art = package.manifest.artifacts[artifact]
        return cls(
            package,
            artifact,
            load_backend(package, artifact, options),
            Preprocessor(package.manifest.preprocess, art.input),
        )

    @property
    def ref(self) -> ModelRef:
        return self.package.ref(self.artifact)

    def close(self) -> None:
        self.backend.close()


@dataclass(slots=True)
class _Work:
    index: int
    ts: float
    tensor: np.ndarray
    inputs: InputStatistics | None
    model: LoadedModel
    capture_ms: float
    preprocess_ms: float
    image: np.ndarray | None


@dataclass(slots=True)
class Inferred:
    """One frame's result as handed to the agent loop."""

    index: int
    ts: float
    probs: np.ndarray
    inputs: InputStatistics | None
    model: LoadedModel
    latency_ms: dict[str, float]
    image: np.ndarray | None = None
    """The camera frame, kept only when the agent samples frames for labelling."""


class Pipeline:
    """Runs a source through the active model; results come out of :meth:`results`."""

    def __init__(
        self,
        source: FrameSource,
        model: LoadedModel,
        *,
        batch: int = 1,
        stats_every: int = 1,
        depth: int = 2,
        on_first_inference: Callable[[], None] | None = None,
        keep_frames: bool = False,
    ) -> None:
        self.source = source
        self._active = model
        self.batch = batch
        self.stats_every = stats_every
        self._work: queue.Queue[object] = queue.Queue(maxsize=max(depth, batch))
        self._out: queue.Queue[object] = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._failed = 0
        self._failure_reasons: dict[str, int] = {}
        self._ended = False
        self._on_first = on_first_inference
        self.keep_frames = keep_frames
        self._stash: object | None = None
        self.inferred = 0

    @property
    def active(self) -> LoadedModel:
        return self._active

    def swap(self, model: LoadedModel) -> LoadedModel:
        """Serve ``model`` from the next frame on; returns the previous model (still loaded)."""
        old, self._active = self._active, model
        return old

    def start(self) -> Pipeline:
        # A short switch interval bounds how long the inference thread waits for the GIL after the
        # runtime returns while another thread runs Python code (default 5 ms, a whole frame).
        sys.setswitchinterval(0.0005)
        for target, name in ((self._preprocess_loop, "preprocess"), (self._inference_loop, "inference")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def take_failures(self) -> tuple[int, dict[str, int]]:
        """Frames that failed in preprocessing or inference since the last call, and why."""
        with self._lock:
            n, reasons = self._failed, self._failure_reasons
            self._failed, self._failure_reasons = 0, {}
            return n, reasons

    def results(self, timeout: float = 0.2) -> list[Inferred]:
        """Results available now (waiting up to ``timeout`` for the first); EndOfStream when done."""
        if self._ended:
            raise EndOfStream(self.source.uri)
        out: list[Inferred] = []
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            return out
        while True:
            if item is _END:
                self._ended = True
                if not out:
                    raise EndOfStream(self.source.uri)
                return out
            out.append(item)  # type: ignore[arg-type]
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return out

    # -- threads -------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        with self._lock:
            self._failed += 1
            self._failure_reasons[reason] = self._failure_reasons.get(reason, 0) + 1

    def _put(self, q: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _preprocess_loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                frame = self.source.read(timeout=0.2)
            except EndOfStream:
                self._put(self._work, _END)
                return
            if frame is None:
                continue
            model = self._active
            t0 = time.perf_counter()
            try:
                tensor, small = model.preprocessor(frame.image)
                inputs = (
                    input_statistics(small, model.package.manifest.preprocess.color)
                    if n % self.stats_every == 0
                    else None
                )
            except FrameError as exc:
                log.debug("frame %d skipped: %s", frame.index, exc)
                self._fail("bad_frame")
                continue
            except Exception:  # noqa: BLE001 - one bad frame must never stop the pipeline
                log.exception("preprocessing failed on frame %d", frame.index)
                self._fail("preprocess_error")
                continue
            n += 1
            work = _Work(
                frame.index,
                frame.ts,
                tensor,
                inputs,
                model,
                frame.capture_ms,
                (time.perf_counter() - t0) * 1000,
                frame.image if self.keep_frames else None,
            )
            if not self._put(self._work, work):
                return

    def _take(self, block: bool) -> object | None:
        """Next work item (a stashed one first); None if nothing arrived."""
        if self._stash is not None:
            item, self._stash = self._stash, None
            return item
        try:
            return self._work.get(timeout=0.2) if block else self._work.get_nowait()
        except queue.Empty:
            return None

    def _inference_loop(self) -> None:
        first_done = False
        while not self._stop.is_set():
            first = self._take(block=True)
            if first is None:
                continue
            if first is _END:
                break
            items: list[_Work] = [first]  # type: ignore[list-item]
            while len(items) < self.batch:  # batch only what is already waiting, never wait for more
                nxt = self._take(block=False)
                if nxt is None:
                    break
                if nxt is _END or nxt.model is not items[0].model:  # type: ignore[attr-defined]
                    self._stash = nxt
                    break
                items.append(nxt)  # type: ignore[arg-type]
            model = items[0].model
            x = items[0].tensor if len(items) == 1 else np.concatenate([w.tensor for w in items])
            t0 = time.perf_counter()
            try:
                raw = model.backend.run(x)
                probs = to_probabilities(
                    raw, model.package.manifest.output_kind, model.package.manifest.temperature
                )
            except Exception as exc:  # noqa: BLE001 - a runtime error costs frames, never the loop
                log.warning("inference failed on %d frame(s) with %s: %s", len(items), model.artifact, exc)
                for _ in items:
                    self._fail("inference_error")
                continue
            infer_ms = (time.perf_counter() - t0) * 1000 / len(items)
            if not first_done:
                first_done = True
                if self._on_first:
                    self._on_first()
            for w, p in zip(items, probs):
                if not np.isfinite(p).all():
                    self._fail("non_finite_output")
                    continue
                self.inferred += 1
                res = Inferred(
                    w.index,
                    w.ts,
                    p,
                    w.inputs,
                    w.model,
                    {"capture": w.capture_ms, "preprocess": w.preprocess_ms, "inference": infer_ms},
                    w.image,
                )
                if not self._put(self._out, res):
                    return
        else:
            return  # stopped
        self._put(self._out, _END)
