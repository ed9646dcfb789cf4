"""`spade demo`: make the embedded sample data set, then fit, score and evaluate on it."""
from __future__ import annotations

import logging
from typing import Callable

from spade.io import storage
from spade.config import SpadeConfig
from spade.io.samples import write_sample_dataset
from pipelines.evaluate import run_evaluate
from pipelines.fit import run_fit
from pipelines.score import run_score

LOG = logging.getLogger("spade")


def run_demo(out_url: str, config: SpadeConfig, beam_args: list[str] | None = None,
             say: Callable[[str], None] = LOG.info) -> dict:
    """The whole method end to end on the embedded sample; returns output locations and metrics."""
    data = write_sample_dataset(storage.join(out_url, "data"))
    say(f"demo: sample data set written to {data}")
    gallery = storage.join(out_url, "gallery")
    scores = storage.join(out_url, "scores")
    evaluation = storage.join(out_url, "eval")
    run_fit(config, storage.join(data, "train", "good"), gallery, beam_args, say)
    run_score(config, gallery, storage.join(data, "test"), scores, beam_args, say)
    metrics = run_evaluate(scores, storage.join(data, "ground_truth"), evaluation, say)
    outputs = {"data": data, "gallery": gallery, "scores": storage.join(scores, "scores"),
               "maps": storage.join(scores, "maps"), "masks": storage.join(scores, "masks"),
               "metrics": storage.join(evaluation, "metrics.json")}
    print("\nDemo outputs:", flush=True)
    for name, where in outputs.items():
        print(f"  {name:8s} {where}", flush=True)
    return {"outputs": outputs, "metrics": metrics}

# The built-in defaults (the recommended config) with the K its 12-image gallery supports.
DEMO_OVERRIDES = {"k": 3}
