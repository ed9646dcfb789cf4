"""Reading inputs through fsspec and decoding them, one error row per bad input."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.config import SpadeConfig
from spade.images import ImageDecodeError, content_id, decode_rgb, preprocess
from spade.sources import label_from_uri, read_inputs
from transforms.records import ERRORS, IMAGES, ImageInput, error_row

LOG = logging.getLogger(__name__)


class DecodeImages(beam.DoFn):
    """Source URI (file or tar shard) → `ImageInput` per image, or an error row tagged ``errors``."""

    def __init__(self, config: SpadeConfig):
        self.config = config
        self.read = Metrics.counter("spade", "images_read")
        self.failed = Metrics.counter("spade", "images_failed")

    def process(self, uri: str):
        for image_uri, data, problem in read_inputs(uri):
            label = label_from_uri(image_uri)
            if problem is not None:
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(image_uri, f"{image_uri}: {problem}", label=label))
                continue
            image_id = content_id(data)
            try:
                rgb = decode_rgb(data)
                cfg = self.config
                tensor = preprocess(rgb, cfg.resize, cfg.crop, cfg.mean, cfg.std).numpy()
            except ImageDecodeError as exc:
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    image_uri, f"{image_uri}: {exc}; replace or remove the file", image_id=image_id, label=label))
                continue
            except Exception as exc:  # one odd image must not end the batch
                LOG.exception("unexpected failure decoding %s", image_uri)
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    image_uri, f"{image_uri}: {exc.__class__.__name__}: {exc}", image_id=image_id, label=label))
                continue
            self.read.inc()
            yield ImageInput(image_uri, image_id, label, int(rgb.shape[1]), int(rgb.shape[0]), tensor)


class ReadImages(beam.PTransform):
    """PCollection of source URIs → tagged outputs ``images`` (`ImageInput`) and ``errors`` (rows)."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        self.config = config

    def expand(self, uris):
        return (uris
                | "Spread" >> beam.Reshuffle()
                | "Decode" >> beam.ParDo(DecodeImages(self.config)).with_outputs(ERRORS, main=IMAGES))
