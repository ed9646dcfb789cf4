"""The elements that flow between our DoFns."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

import apache_beam as beam


@dataclass(frozen=True)
class WorkUnit:
    """Where an input came from: its source URI (a file, or the tar shard holding it), and the unit of work
    (a batch of sources) it belongs to: the unit's stable key and how many rows the unit gives in all."""

    source: str
    key: str
    size: int

    def columns(self) -> dict[str, Any]:
        """What every row of this unit carries, so the ledger can commit the unit when all its rows are in."""
        return {"source": self.source, "unit": self.key, "unit_size": self.size}


@dataclass
class ImageInput:
    """A decoded, preprocessed image: identity, original size, MVTec label, its (3, H, W) frame tensor, and whether
    its aspect differs from the frame's (``reframed``: stretched into the gallery's frame size)."""

    uri: str
    image_id: str
    label: str
    width: int
    height: int
    tensor: np.ndarray
    work: WorkUnit | None = None
    reframed: bool = False


@dataclass
class ImageFeatures:
    """An image and its features, as the extractor produced them."""

    image: ImageInput
    embedding: np.ndarray
    pyramid: dict[str, np.ndarray]


def error_row(uri: str, error: str, image_id: str | None = None, label: str = "", width: int | None = None,
              height: int | None = None, **extra: Any) -> dict[str, Any]:
    """A table row for an input that could not be processed; ``error`` says why."""
    return {"uri": uri, "image_id": image_id, "label": label, "width": width, "height": height,
            "status": "error", "error": error, **extra}


def is_error(element: Any) -> bool:
    return isinstance(element, dict) and element.get("status") == "error"


class SplitErrors(beam.PTransform):
    """One PCollection of payloads and error rows → (payloads, error rows).

    Our DoFns emit errors on their single main output rather than as tagged
    outputs: Beam's Dask runner delivers every tagged output to every consumer.
    """

    def expand(self, pcoll):
        return (pcoll | "Payloads" >> beam.Filter(lambda e: not is_error(e)),
                pcoll | "Errors" >> beam.Filter(is_error))


def image_columns(image: ImageInput) -> dict[str, Any]:
    """An image's identity columns (and its unit of work's, which tables without those columns drop)."""
    work = image.work.columns() if image.work is not None else {}
    return {"uri": image.uri, "image_id": image.image_id, "label": image.label, "width": image.width,
            "height": image.height, **work}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id(now: datetime) -> str:
    """A unique, time-ordered name for one run's staging folder and appended files."""
    return now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def embedding_row(item: ImageFeatures, feature_dtype: str, pyramid_shard: str, pyramid_row: int) -> dict[str, Any]:
    """The embeddings-table row of one image (see `spade.io.tables.embeddings_schema`); its pyramid is row
    ``pyramid_row`` of shard ``pyramid_shard``."""
    row = {**image_columns(item.image), "embedding": np.asarray(item.embedding, dtype=np.float32).tolist(),
           "feature_dtype": feature_dtype, "pyramid_shard": pyramid_shard, "pyramid_row": int(pyramid_row)}
    for layer, layer_map in item.pyramid.items():
        channels, height, width = layer_map.shape
        row[f"{layer}_shape"] = [height * width, channels]
    return row


def routed(value: Any) -> dict[str, Any]:
    """A per-route mapping: ``value`` itself when it is one, else ``{"": value}`` (a run of one gallery). Routed runs
    key their elements by route (`spade.io.routing`): ``(route, payload)`` tuples, and rows carry ``route``."""
    return dict(value) if isinstance(value, Mapping) else {"": value}


def route_of(row: dict[str, Any]) -> str:
    """The route a row belongs to ("" in a run of one gallery)."""
    return row.get("route", "")
