"""Arrow schemas of the project's tables and (de)serialising feature rows.

Embedding rows point at their pyramid's shard file and row (fit's workers write the shards) and keep each
layer's (positions, channels) shape.
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

IMAGE_COLUMNS = [
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("label", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]


def embeddings_schema(layers: Iterable[str]) -> pa.Schema:
    """Fit's table: one row per image; its pyramid lives in shard files (`spade.index.pyramid`), the row says where."""
    fields = list(IMAGE_COLUMNS) + [pa.field("embedding", pa.list_(pa.float32())),
                                    pa.field("pyramid_shard", pa.string()), pa.field("pyramid_row", pa.int32()),
                                    pa.field("pyramid_digests", pa.string())]
    for name in layers:
        fields.append(pa.field(f"{name}_shape", pa.list_(pa.int32())))
    fields.append(pa.field("feature_dtype", pa.string()))
    return pa.schema(fields)


def fit_rows_schema(layers: Iterable[str]) -> pa.Schema:
    """Fit's rows, accepted (embedding rows) and rejected (error rows), in one schema: what its ledger commits."""
    return embeddings_schema(layers).append(pa.field("status", pa.string())).append(pa.field("error", pa.string()))


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


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) → a table with exactly ``schema``'s columns; missing keys become nulls."""
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema=schema)
