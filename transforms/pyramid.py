"""Fit's workers write the gallery's pyramid shards themselves; only small embedding rows travel on."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import apache_beam as beam

from spade.index.pyramid import npy_bytes, shard_key, shard_path
from spade.io import storage
from transforms.records import embedding_row


def positions_major(layer_map: np.ndarray, dtype: str) -> np.ndarray:
    """(C, H, W) map → (H*W, C) array in ``dtype``: the row layout of a gallery pyramid."""
    channels, height, width = layer_map.shape
    return np.ascontiguousarray(layer_map.reshape(channels, height * width).T, dtype=dtype)


class WritePyramidShards(beam.DoFn):
    """A list of `ImageFeatures` → one pyramid shard per layer under ``gallery_url`` → the batch's embedding rows,
    each pointing at its shard and row.

    Shards are named by the batch's image ids and ``features`` (what decides the feature values: a hash of the
    feature settings, weights and dtype), so the same batch always writes the same file with the same content
    (a retried bundle rewrites it atomically) and another config never overwrites a shard a gallery still uses.
    """

    def __init__(self, gallery_url: str, layers: tuple[str, ...], feature_dtype: str, features: str):
        self.gallery_url, self.layers, self.feature_dtype, self.features = gallery_url, tuple(layers), feature_dtype, features

    def process(self, batch):
        key = shard_key([self.features] + [item.image.image_id for item in batch])
        digests = {}
        for layer in self.layers:
            data = npy_bytes(np.stack([positions_major(item.pyramid[layer], self.feature_dtype) for item in batch]))
            storage.atomic_write_bytes(storage.join(self.gallery_url, shard_path(layer, key)), data)
            digests[layer] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # for the manifest's files
        yield [{**embedding_row(item, self.feature_dtype, key, row), "pyramid_digests": json.dumps(digests, sort_keys=True)}
               for row, item in enumerate(batch)]
