"""Counting finished elements into a folder the launching process watches (local runners)."""
from __future__ import annotations

import os
import time
import uuid

import apache_beam as beam


class CountProgress(beam.DoFn):
    """Pass elements through; every second, record how many this DoFn instance has seen in
    ``folder/<unique>.count`` so `pipelines.progress.ProgressReporter` can sum them."""

    def __init__(self, folder: str | None):
        self.folder = folder

    def setup(self):
        self._path = os.path.join(self.folder or "", f"{os.getpid()}-{uuid.uuid4().hex}.count")
        self._count = 0
        self._last = 0.0

    def process(self, element):
        self._count += 1
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._flush()
            self._last = now
        yield element

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if self.folder is None:
            return
        try:
            tmp = f"{self._path}.tmp"
            with open(tmp, "w") as handle:
                handle.write(str(self._count))
            os.replace(tmp, self._path)
        except OSError:
            pass
