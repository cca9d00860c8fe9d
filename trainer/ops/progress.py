"""Progress reporting for long work (export, training, benchmarks) on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Steps:
    """Numbered steps with elapsed time: ``[export 3/6] tflite-fp32 ... 12.1 s``."""

    def __init__(self, title: str, total: int, enabled: bool = True) -> None:
        self.title = title
        self.total = total
        self.enabled = enabled
        self.n = 0
        self.t0 = time.perf_counter()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        t = time.perf_counter()
        if self.enabled:
            print(f"[{self.title} {self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(
                f"[{self.title} {self.n}/{self.total}] {what} done in {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.title}] {text}", file=sys.stderr, flush=True)
