"""`spade evaluate`: a score run + ground truth → metrics.json, metrics.csv, thresholds.json and a printed table."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from typing import Any, Callable

from spade.io import storage
from spade.evaluation.ground_truth import GOOD, evaluate, format_table, labelled_rows, load_pixels, metrics_table
from spade.io.results import read_run_info, read_score_table
from spade.evaluation.thresholds import (AUTO, format_operating_points, miss_rate_threshold, operating_points,
                                        run_thresholds)

THRESHOLDS = "thresholds.json"

LOG = logging.getLogger("spade")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def select_run_thresholds(table, config: dict, masks_root: str | None, method: str = AUTO, image_fpr: float = 0.05,
                          pixel_fpr: float | None = None, progress: Callable[[str], None] = lambda _: None,
                          pixels: tuple | None = None) -> dict:
    """thresholds.json of a run: image threshold from labelled image scores, pixel threshold from the
    evaluated score maps (with ground truth; without ``masks_root``, from the good images' maps).
    ``pixels``: `load_pixels` of the labelled rows with ground truth, when already read."""
    pixel_fpr = config.get("calibration_fpr", 0.001) if pixel_fpr is None else pixel_fpr
    ok = labelled_rows(table)
    if masks_root is not None and pixels is not None:
        _, maps, masks, _ = pixels
    else:
        pixel_rows = ok if masks_root is not None else [r for r in ok if r["label"] == GOOD]
        _, maps, masks, _ = load_pixels(pixel_rows, masks_root, config["resize"], config["crop"], config["eval_region"],
                                        progress)
    chosen = run_thresholds([r["label"] != GOOD for r in ok] if ok else None, [r["image_score"] for r in ok],
                            maps, masks, method, image_fpr, pixel_fpr)
    chosen["source"] = "evaluate"
    chosen["eval_region"] = config["eval_region"]
    return chosen


def run_evaluate(scores_url: str, masks_root: str | None, out_url: str, say: Callable[[str], None] = LOG.info,
                 threshold_method: str = AUTO, image_fpr: float = 0.05, pixel_fpr: float | None = None,
                 image_miss_rate: float | None = None) -> dict:
    """Evaluate the run in ``scores_url``; writes metrics.json, metrics.csv and thresholds.json under ``out_url``.

    Thresholds (see spade.evaluation.thresholds): ``threshold_method`` 'auto' takes max F1 where defects are
    labelled, else the rate ``image_fpr`` / ``pixel_fpr`` (default: the run's calibration_fpr)
    of flagged good images / pixels; ``image_miss_rate`` chooses the image threshold missing at most that share of
    the defective images instead. `spade score --thresholds out/thresholds.json` applies them. The operating points
    (good flagged against defective missed at several thresholds, and at the run's) go to metrics.json and are printed.
    """
    info = read_run_info(scores_url)
    config = info["config"]
    table = read_score_table(scores_url)
    pixels = None
    if masks_root is not None:
        pixels = load_pixels(labelled_rows(table), masks_root, config["resize"], config["crop"], config["eval_region"], say)
    result = evaluate(table, masks_root, config["resize"], config["crop"], config["eval_region"], progress=say,
                      pixels=pixels)
    for problem in result["problems"]:
        say(f"evaluate: {problem}")
    result["thresholds"] = select_run_thresholds(table, config, masks_root, threshold_method, image_fpr, pixel_fpr,
                                                 pixels=pixels)
    ok = labelled_rows(table)
    labels, image_scores = [r["label"] != GOOD for r in ok], [r["image_score"] for r in ok]
    if image_miss_rate is not None:
        threshold = miss_rate_threshold(labels, image_scores, image_miss_rate)
        result["thresholds"]["image"] = threshold
        result["thresholds"]["image_selection"] = {"method": "target_miss", "threshold": threshold,
                                                   "target_miss": image_miss_rate}
    if ok:
        result["operating_points"] = operating_points(labels, image_scores, (info.get("thresholds") or {}).get("image"))
        print("Operating points (image threshold):\n" + format_operating_points(result["operating_points"]), flush=True)
    for kind in ("image", "pixel"):
        selection = result["thresholds"][f"{kind}_selection"]
        if selection["threshold"] is None:
            say(f"evaluate: {selection['reason']}")
        else:
            how = (f", F1 {selection['f1']:.3f})" if "f1" in selection else f", FPR {selection['fpr']:.4f})" if "fpr" in selection
                   else f", at most {selection['target_miss']:.1%} of the defective images missed)")
            say(f"evaluate: {kind} threshold {selection['threshold']:.6g} ({selection['method']}{how}")
    rows = metrics_table(result)
    storage.write_json(storage.join(out_url, "metrics.json"), _json_safe(result))
    storage.write_json(storage.join(out_url, THRESHOLDS), _json_safe(result["thresholds"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["defect", "images", "image_rocauc", "pixel_rocauc", "pro"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_bytes(storage.join(out_url, "metrics.csv"), buffer.getvalue().encode())
    print(format_table(rows), flush=True)
    say(f"evaluate: {json.dumps(result['counts'])}; metrics in {storage.join(out_url, 'metrics.json')} and metrics.csv, "
        f"thresholds in {storage.join(out_url, THRESHOLDS)}")
    return result
