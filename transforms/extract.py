"""Batched feature extraction with the backbone loaded once per worker process."""
from __future__ import annotations

import logging
import time
from typing import Mapping

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from spade.features.backbone import FeatureExtractor
from spade.config import SpadeConfig, stable_hash
from spade.scoring.correspondence import configure_threads
from transforms.cache import acquire
from transforms.records import ImageFeatures, SplitErrors, error_row, image_columns, routed

LOG = logging.getLogger(__name__)


def extractor_key(config: SpadeConfig) -> str:
    """What one loaded backbone serves: the feature settings bar the frame size, which the extractor takes from each
    batch (galleries of one run routed to several cameras share the model whatever their frames)."""
    return stable_hash({key: value for key, value in config.feature_signature().items() if key != "frame_size"}
                       | {"batch_size": config.batch_size, "runtime": config.feature_runtime})


class ExtractBatch(beam.DoFn):
    """(route, list of `ImageInput`) → (route, list of `ImageFeatures`); a failing batch is retried image by image.
    Routes whose feature settings agree (bar the frame size) share one loaded backbone."""

    def __init__(self, configs: dict[str, SpadeConfig], shared: Shared):
        self.configs = configs
        self._shared = shared
        self.latency = Metrics.distribution("spade", "extract_ms_per_image")

    def setup(self):
        configure_threads(next(iter(self.configs.values())).num_threads)
        self.extractors: dict[str, FeatureExtractor] = {}

    def _extractor(self, route: str) -> FeatureExtractor:
        if route not in self.extractors:
            config = self.configs[route]
            self.extractors[route] = acquire(self._shared, extractor_key(config), lambda: FeatureExtractor(config))
        return self.extractors[route]

    def process(self, routed_batch):
        route, batch = routed_batch
        start = time.perf_counter()
        try:
            features = self._extract(route, batch)
        except Exception:
            if len(batch) == 1:
                image = batch[0]
                LOG.exception("feature extraction failed for %s", image.uri)
                yield error_row(**image_columns(image), error=f"{image.uri}: feature extraction failed", route=route)
                return
            for image in batch:
                yield from self.process((route, [image]))
            return
        # Timed before the yield: a fused runner runs the downstream steps (scoring, writing) inside it.
        self.latency.update(int((time.perf_counter() - start) * 1000 / max(len(batch), 1)))
        yield route, features

    def _extract(self, route: str, batch):
        features = self._extractor(route)(torch.from_numpy(np.stack([image.tensor for image in batch])))
        return [ImageFeatures(image, features.embedding[i], {k: v[i] for k, v in features.pyramid.items()})
                for i, image in enumerate(batch)]


class ExtractFeatures(beam.PTransform):
    """(route, lists of `ImageInput`) → ((route, lists of `ImageFeatures`), error rows); ``configs``: the config, or
    {route: config} of a routed run."""

    def __init__(self, configs: SpadeConfig | Mapping[str, SpadeConfig]):
        super().__init__()
        self.configs = routed(configs)

    def expand(self, images):
        return (images
                | "Extract" >> beam.ParDo(ExtractBatch(self.configs, Shared()))
                | "Split" >> SplitErrors())
