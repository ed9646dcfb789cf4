"""Fit's workers write the gallery's pyramid shards themselves; only small embedding rows travel on."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import apache_beam as beam

from spade.index.pyramid import npy_bytes, shard_key, shard_path
from spade.io import storage
from transforms.records import embedding_row


def positions_major(layer_map: np.ndarray, dtype: str) -> np.ndarray:
    """(C, H, W) map → (H*W, C) array in ``dtype``: the row layout of a gallery pyramid."""
    channels, height, width = layer_map.shape
    return np.ascontiguousarray(layer_map.reshape(channels, height * width).T, dtype=dtype)


@dataclass(frozen=True)
class PyramidTarget:
    """Where a route's pyramid shards go: its gallery, the layers and dtype stored, and ``features`` (a hash of what
    decides the feature values: feature settings, weights and dtype)."""

    gallery_url: str
    layers: tuple[str, ...]
    feature_dtype: str
    features: str


class WritePyramidShards(beam.DoFn):
    """(route, list of `ImageFeatures`) → one pyramid shard per layer under the route's gallery → the batch's
    embedding rows (each carrying ``route``), each pointing at its shard and row.

    Shards are named by the batch's image ids and ``features``, so the same batch always writes the same file with
    the same content (a retried bundle rewrites it atomically) and another config never overwrites a shard a gallery
    still uses.
    """

    def __init__(self, targets: dict[str, PyramidTarget]):
        self.targets = targets

    def process(self, routed_batch):
        route, batch = routed_batch
        target = self.targets[route]
        key = shard_key([target.features] + [item.image.image_id for item in batch])
        digests = {}
        for layer in target.layers:
            data = npy_bytes(np.stack([positions_major(item.pyramid[layer], target.feature_dtype) for item in batch]))
            storage.atomic_write_bytes(storage.join(target.gallery_url, shard_path(layer, key)), data)
            digests[layer] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # for the manifest's files
        yield [{**embedding_row(item, target.feature_dtype, key, row), "pyramid_digests": json.dumps(digests, sort_keys=True),
                "route": route} for row, item in enumerate(batch)]
