"""Reading inputs through fsspec and decoding them, one error row per bad input."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.config import SpadeConfig
from spade.io.images import ImageDecodeError, content_id, decode_rgb, preprocess
from spade.io.sources import label_from_uri, read_inputs
from transforms.records import ImageInput, SplitErrors, error_row

LOG = logging.getLogger(__name__)


class DecodeImages(beam.DoFn):
    """A list of source URIs (files or tar shards) → lists of up to ``batch_size`` `ImageInput`s,
    and one error row per bad input.

    Batches are formed here, at the source, rather than with `beam.BatchElements`:
    that emits its last batch from finish_bundle, which Beam's Dask runner drops.
    """

    def __init__(self, config: SpadeConfig):
        self.config = config
        self.read = Metrics.counter("spade", "images_read")
        self.failed = Metrics.counter("spade", "images_failed")

    def process(self, uris: list[str]):
        batch: list[ImageInput] = []
        for element in self._decode_all(uris):
            if isinstance(element, ImageInput):
                batch.append(element)
                if len(batch) == self.config.batch_size:
                    yield batch
                    batch = []
            else:
                yield element
        if batch:
            yield batch

    def _decode_all(self, uris: list[str]):
        for image_uri, data, problem in (item for uri in uris for item in read_inputs(uri)):
            label = label_from_uri(image_uri)
            if problem is not None:
                self.failed.inc()
                yield error_row(image_uri, f"{image_uri}: {problem}", label=label)
                continue
            image_id = content_id(data)
            try:
                rgb = decode_rgb(data)
                cfg = self.config
                tensor = preprocess(rgb, cfg.resize, cfg.crop, cfg.mean, cfg.std).numpy()
            except ImageDecodeError as exc:
                self.failed.inc()
                yield error_row(image_uri, f"{image_uri}: {exc}; replace or remove the file", image_id=image_id, label=label)
                continue
            except Exception as exc:  # one odd image must not end the batch
                LOG.exception("unexpected failure decoding %s", image_uri)
                self.failed.inc()
                yield error_row(image_uri, f"{image_uri}: {exc.__class__.__name__}: {exc}", image_id=image_id, label=label)
                continue
            self.read.inc()
            yield ImageInput(image_uri, image_id, label, int(rgb.shape[1]), int(rgb.shape[0]), tensor)


class ReadImages(beam.PTransform):
    """PCollection of lists of source URIs → (lists of `ImageInput`, error rows)."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        self.config = config

    def expand(self, uris):
        return (uris
                | "Spread" >> beam.Reshuffle()
                | "Decode" >> beam.ParDo(DecodeImages(self.config))
                | "Split" >> SplitErrors())

