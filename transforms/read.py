"""Reading inputs through fsspec and decoding them, one error row per bad input."""
from __future__ import annotations

import logging
from typing import Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.config import SpadeConfig
from spade.features.framing import framing_for
from spade.io.images import DecodeLimits, ImageBeyondLimits, ImageDecodeError, content_id, decode_rgb, preprocess
from spade.io.ledger import unit_key
from spade.io.sources import count_inputs, is_tar, label_from_uri, read_inputs
from spade.io.storage import object_store_copy
from spade.scoring.lanes import each_in_lanes
from transforms.records import ImageInput, SplitErrors, WorkUnit, error_row, routed

LOG = logging.getLogger(__name__)


class DecodeImages(beam.DoFn):
    """(route, list of source URIs (files or tar shards)) → (route, lists of up to ``batch_size`` `ImageInput`s), and
    one error row per bad input (carrying its ``route``). Each route's images are framed by its config (its
    gallery's frame size).

    Batches are formed here, at the source, rather than with `beam.BatchElements`:
    that emits its last batch from finish_bundle, which Beam's Dask runner drops.
    """

    def __init__(self, configs: dict[str, SpadeConfig]):
        self.configs = configs
        self.read = Metrics.counter("spade", "images_read")
        self.failed = Metrics.counter("spade", "images_failed")
        self.reframed = Metrics.counter("spade", "images_reframed")

    def setup(self):
        self.framings = {route: framing_for(config) for route, config in self.configs.items()}

    def process(self, routed_uris: tuple[str, list[str]]):
        route, uris = routed_uris
        batch: list[ImageInput] = []
        for element in self._decode_all(route, uris):
            if isinstance(element, ImageInput):
                batch.append(element)
                if len(batch) == self.configs[route].batch_size:
                    yield route, batch
                    batch = []
            else:
                yield {**element, "route": route}
        if batch:
            yield route, batch

    def _decode_all(self, route: str, uris: list[str]):
        """Each input's `ImageInput` or error row, in input order; ``batch_size`` inputs at a time are decoded in
        lanes (`each_in_lanes`: Pillow's decoders and resampling release the GIL), the counters counted here."""
        cfg = self.configs[route]
        for chunk in _chunks(self._inputs(uris), max(1, cfg.batch_size)):
            for element in each_in_lanes(lambda item: self._decode_one(route, *item), chunk, cfg.num_threads):
                if isinstance(element, ImageInput):
                    self.read.inc()
                    if element.reframed:
                        self.reframed.inc()
                else:
                    self.failed.inc()
                yield element

    @staticmethod
    def _inputs(uris: list[str]):
        """(image URI, bytes or None, problem or None, `WorkUnit`) of every input of a unit of work."""
        key = unit_key(uris)
        if len(uris) == 1 and is_tar(uris[0]):  # a shard is a unit of its own: counted and read from one download
            with object_store_copy(uris[0]) as local:
                work = WorkUnit(uris[0], key, count_inputs(uris[0], local))
                for image_uri, data, problem in read_inputs(uris[0], local):
                    yield image_uri, data, problem, work
            return
        size = sum(count_inputs(uri) for uri in uris)
        for source in uris:
            work = WorkUnit(source, key, size)
            for image_uri, data, problem in read_inputs(source):
                yield image_uri, data, problem, work

    def _decode_one(self, route: str, image_uri: str, data: bytes | None, problem: str | None,
                    work: WorkUnit) -> ImageInput | dict:
        cfg, framing = self.configs[route], self.framings[route]
        label = label_from_uri(image_uri)
        if problem is not None:
            return error_row(image_uri, f"{image_uri}: {problem}", label=label, **work.columns())
        image_id = content_id(data)
        try:
            rgb = decode_rgb(data, decode_limits(cfg))
            tensor = preprocess(rgb, cfg.resize, cfg.crop, cfg.mean, cfg.std, framing, cfg.brightness).numpy()
            height, width = rgb.shape[:2]
            reframed = framing.reframed((width, height))
            del rgb, data  # not held while the batch is extracted and scored downstream
        except ImageDecodeError as exc:
            fix = "" if isinstance(exc, ImageBeyondLimits) else "; replace or remove the file"
            return error_row(image_uri, f"{image_uri}: {exc}{fix}", image_id=image_id, label=label, **work.columns())
        except Exception as exc:  # one odd image must not end the batch
            LOG.exception("unexpected failure decoding %s", image_uri)
            return error_row(image_uri, f"{image_uri}: {exc.__class__.__name__}: {exc}", image_id=image_id, label=label,
                             **work.columns())
        return ImageInput(image_uri, image_id, label, int(width), int(height), tensor, work, reframed)


def _chunks(items, size: int):
    """Lists of up to ``size`` consecutive items of an iterable."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decode_limits(config: SpadeConfig) -> DecodeLimits:
    """The header checks of `decode_rgb` that the config asks for (max_source_pixels, max_aspect_ratio)."""
    return DecodeLimits(config.max_source_pixels, config.max_aspect_ratio)


class ReadImages(beam.PTransform):
    """(route, lists of source URIs) → ((route, lists of `ImageInput`), error rows); ``configs``: the config, or
    {route: config} of a routed run."""

    def __init__(self, configs: SpadeConfig | Mapping[str, SpadeConfig]):
        super().__init__()
        self.configs = routed(configs)

    def expand(self, uris):
        return (uris
                | "Spread" >> beam.Reshuffle()
                | "Decode" >> beam.ParDo(DecodeImages(self.configs))
                | "Split" >> SplitErrors())
