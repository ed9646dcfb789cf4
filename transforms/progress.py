"""Counting elements for the launcher's progress line: Beam metrics (every runner that has them, read while the job
runs) and, for local runners, count files in a folder the launching process watches."""
from __future__ import annotations

import os
import time
import uuid
from typing import Any, Callable

import apache_beam as beam
from apache_beam.metrics import Metrics


def _one(element: Any) -> int:
    return 1


class CountProgress(beam.DoFn):
    """Pass elements through, counting them (each weighs ``weight(element)``): into the metric ``progress_<kind>``
    (``done``: images finished, ``total``: images to do) and, every second, into ``folder/<unique>.<kind>`` so
    `pipelines.progress.ProgressReporter` can sum them where the folder is reachable."""

    def __init__(self, folder: str | None, kind: str = "done", weight: Callable[[Any], int] = _one):
        self.folder, self.kind, self.weight = folder, kind, weight
        self.counter = Metrics.counter("spade", f"progress_{kind}")

    def setup(self):
        self._path = os.path.join(self.folder or "", f"{os.getpid()}-{uuid.uuid4().hex}.{self.kind}")
        self._count = 0
        self._last = 0.0

    def process(self, element):
        weight = self.weight(element)
        self._count += weight
        self.counter.inc(weight)
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._flush()
            self._last = now
        yield element

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if self.folder is None or not os.path.isdir(self.folder):
            return
        try:
            tmp = f"{self._path}.tmp"
            with open(tmp, "w") as handle:
                handle.write(str(self._count))
            os.replace(tmp, self._path)
        except OSError:
            pass
