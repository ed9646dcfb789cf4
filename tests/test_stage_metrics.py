"""Per-stage Beam metrics time their own stage only, not the fused steps downstream of their yield."""
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.utils.shared import Shared

from pipelines.options import beam_options
from tests.conftest import BEAM_ARGS, plumbing_config
from transforms.extract import ExtractBatch
from transforms.records import ImageInput

DOWNSTREAM_SECONDS = 0.4


class _InstantExtract(ExtractBatch):
    """`ExtractBatch.process` (the timer under test) around an extraction that takes no time: no model."""

    def setup(self):
        pass

    def _extract(self, route, batch):
        return [image.uri for image in batch]


class _SlowDownstream(beam.DoFn):
    """Stands in for scoring: slow work fused after extraction in the same bundle."""

    def process(self, routed_batch):
        time.sleep(DOWNSTREAM_SECONDS)
        yield len(routed_batch[1])


def test_extract_metric_excludes_downstream_work():
    batches = [("", [ImageInput(uri=f"mem://{i}.png", image_id=f"{i:016x}", label="good", width=8, height=8,
                           tensor=np.zeros((3, 8, 8), dtype=np.float32))]) for i in range(3)]
    pipeline = beam.Pipeline(options=beam_options(BEAM_ARGS))
    _ = (pipeline
         | beam.Create(batches, reshuffle=False)
         | beam.ParDo(_InstantExtract({"": plumbing_config()}, Shared()))
         | beam.ParDo(_SlowDownstream()))
    started = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    assert time.perf_counter() - started >= 3 * DOWNSTREAM_SECONDS  # the slow step did run, once per batch
    found = result.metrics().query(MetricsFilter().with_namespace("spade").with_name("extract_ms_per_image"))
    latency = found["distributions"][0].committed
    assert latency.count == 3
    # Each batch is one image; a timer stopped after the yield reads >= 400 ms for every batch (the
    # downstream sleep), one stopped before it reads the instant extraction.
    assert 0 <= latency.min < 0.5 * DOWNSTREAM_SECONDS * 1000, latency
