"""Batched feature extraction with the backbone loaded once per worker process."""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from spade.features.backbone import FeatureExtractor
from spade.config import SpadeConfig, stable_hash
from spade.scoring.correspondence import configure_threads
from transforms.cache import acquire
from transforms.records import ImageFeatures, SplitErrors, error_row, image_columns

LOG = logging.getLogger(__name__)


def extractor_key(config: SpadeConfig) -> str:
    """What one loaded backbone serves: the feature settings bar the frame size, which the extractor takes from each
    batch (galleries of one run routed to several cameras share the model whatever their frames)."""
    return stable_hash({key: value for key, value in config.feature_signature().items() if key != "frame_size"}
                       | {"batch_size": config.batch_size})


class ExtractBatch(beam.DoFn):
    """A list of `ImageInput` → a list of `ImageFeatures`; a failing batch is retried image by image."""

    def __init__(self, config: SpadeConfig, shared: Shared):
        self.config = config
        self._shared = shared
        self.extractor: FeatureExtractor | None = None
        self.latency = Metrics.distribution("spade", "extract_ms_per_image")

    def setup(self):
        configure_threads(self.config.num_threads)
        self.extractor = acquire(self._shared, extractor_key(self.config), lambda: FeatureExtractor(self.config))

    def process(self, batch):
        start = time.perf_counter()
        try:
            features = self._extract(batch)
        except Exception:
            if len(batch) == 1:
                image = batch[0]
                LOG.exception("feature extraction failed for %s", image.uri)
                yield error_row(**image_columns(image), error=f"{image.uri}: feature extraction failed")
                return
            for image in batch:
                yield from self.process([image])
            return
        # Timed before the yield: a fused runner runs the downstream steps (scoring, writing) inside it.
        self.latency.update(int((time.perf_counter() - start) * 1000 / max(len(batch), 1)))
        yield features

    def _extract(self, batch):
        features = self.extractor(torch.from_numpy(np.stack([image.tensor for image in batch])))
        return [ImageFeatures(image, features.embedding[i], {k: v[i] for k, v in features.pyramid.items()})
                for i, image in enumerate(batch)]


class ExtractFeatures(beam.PTransform):
    """Lists of `ImageInput` → (lists of `ImageFeatures`, error rows)."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        self.config = config

    def expand(self, images):
        return (images
                | "Extract" >> beam.ParDo(ExtractBatch(self.config, Shared()))
                | "Split" >> SplitErrors())
