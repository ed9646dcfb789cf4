"""Arrow schemas of the project's tables and (de)serialising feature rows.

Embedding rows keep each pyramid layer as raw bytes of a (positions, channels)
array plus its shape, so a row can be decoded without knowing the backbone.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa

IMAGE_COLUMNS = [
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("label", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]


def embeddings_schema(layers: Iterable[str]) -> pa.Schema:
    fields = list(IMAGE_COLUMNS) + [pa.field("embedding", pa.list_(pa.float32()))]
    for name in layers:
        fields += [pa.field(name, pa.binary()), pa.field(f"{name}_shape", pa.list_(pa.int32()))]
    fields.append(pa.field("feature_dtype", pa.string()))
    return pa.schema(fields)


SCORES_SCHEMA = pa.schema(list(IMAGE_COLUMNS) + [
    pa.field("image_score", pa.float64()),
    pa.field("pixel_max", pa.float64()),
    pa.field("is_anomalous", pa.bool_()),
    pa.field("map_uri", pa.string()),
    pa.field("mask_uri", pa.string()),
    pa.field("neighbours", pa.list_(pa.string())),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("gallery_hash", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),
])

ERRORS_SCHEMA = pa.schema(list(IMAGE_COLUMNS) + [
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
])


def encode_layer(layer_map: np.ndarray, dtype: str) -> tuple[bytes, list[int]]:
    """(C, H, W) float map → bytes of its (H*W, C) position-major array in ``dtype``, and that shape."""
    channels, height, width = layer_map.shape
    positions = np.ascontiguousarray(layer_map.reshape(channels, height * width).T, dtype=dtype)
    return positions.tobytes(), [height * width, channels]


def decode_layer(blob: bytes, shape: list[int], dtype: str) -> np.ndarray:
    """Inverse of `encode_layer`: a (positions, channels) array."""
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) → a table with exactly ``schema``'s columns; missing keys become nulls."""
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema=schema)
