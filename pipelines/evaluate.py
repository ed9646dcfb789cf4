"""`spade evaluate`: a score run + ground truth → metrics.json, metrics.csv and a printed table."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from typing import Any, Callable

from spade import storage
from spade.evaluation import evaluate, format_table, metrics_table
from spade.results import read_run_info, read_score_table

LOG = logging.getLogger("spade")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_evaluate(scores_url: str, masks_root: str | None, out_url: str, say: Callable[[str], None] = LOG.info) -> dict:
    """Evaluate the run in ``scores_url``; writes metrics.json and metrics.csv under ``out_url``."""
    config = read_run_info(scores_url)["config"]
    table = read_score_table(scores_url)
    result = evaluate(table, masks_root, config["resize"], config["crop"], config["eval_region"], progress=say)
    for problem in result["problems"]:
        say(f"evaluate: {problem}")
    rows = metrics_table(result)
    storage.write_json(storage.join(out_url, "metrics.json"), _json_safe(result))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["defect", "images", "image_rocauc", "pixel_rocauc", "pro"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_bytes(storage.join(out_url, "metrics.csv"), buffer.getvalue().encode())
    print(format_table(rows), flush=True)
    say(f"evaluate: {json.dumps(result['counts'])}; metrics in {storage.join(out_url, 'metrics.json')} and metrics.csv")
    return result
