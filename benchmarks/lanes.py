"""Two lanes against one (`spade.scoring.lanes`): `spade fit` (its leave-one-out calibration) and `spade score` (the
exact search of a batch's images), alternating in one process.

    python benchmarks/lanes.py                                           # metal_plate, default config, 3 rounds
    python benchmarks/lanes.py --data ../shared/data/mvtec_ad_bottle --rounds 2
    python benchmarks/lanes.py --part per-image --config configs/approximate.yaml   # only the per-image steps

Each round runs the whole `run_fit` call `spade fit` makes and the whole `run_score` call `spade score` makes twice:
once with `lanes_for` replaced by one lane of every thread (the code before the lanes: the baseline), once as
shipped (two lanes of half the threads). With ``--part per-image`` the baseline differs from the shipped code in
`each_in_lanes` alone (a batch's maps finished and its PNGs encoded and written one image after another), the
searches in lanes in both. A warm-up round is not kept. Printed: fit, calibration and score seconds
per run, their medians, the ratios (baseline over lanes), and whether the image thresholds and the score tables
agree. The last line is machine-readable:

    RESULT calibration_speedup=<baseline / lanes> fit_speedup=<...> score_speedup=<...> thresholds_equal=<0|1>
           scores_equal=<0|1>
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.fit as fit_module  # noqa: E402
import spade.scoring.batch as batch_module  # noqa: E402
import spade.scoring.calibration as calibration_module  # noqa: E402
import spade.scoring.lanes as lanes_module  # noqa: E402
import transforms.read as read_transform  # noqa: E402
import transforms.score as score_transform  # noqa: E402
from pipelines.score import run_score  # noqa: E402
from spade.config import load_config  # noqa: E402
from spade.io.results import read_score_table  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MODULES = (lanes_module, batch_module, calibration_module)


def one_lane(num_threads: int) -> tuple[int, int]:
    """The baseline: one lane of every thread."""
    return 1, num_threads if num_threads > 0 else (os.cpu_count() or 1)


def use(lanes_for) -> None:
    for module in MODULES:
        module.lanes_for = lanes_for


def each_in_sequence(work, items, num_threads: int) -> list:
    """The per-image baseline: `each_in_lanes` one item after another."""
    return [work(item) for item in items]


def use_each(each) -> None:
    for module in (batch_module, score_transform, read_transform):
        module.each_in_lanes = each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "mpdd_metal_plate"), help="an MVTec-layout folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--part", choices=("all", "per-image"), default="all",
                        help="all: one lane everywhere against the shipped lanes; per-image: only the per-image "
                             "steps (`each_in_lanes`) one image after another against the shipped code")
    args = parser.parse_args()
    config = load_config(args.config)
    shipped, loo = lanes_module.lanes_for, fit_module.leave_one_out_scores
    shipped_each = lanes_module.each_in_lanes
    if args.part == "per-image":
        baseline = (shipped, each_in_sequence)
    else:
        baseline = (one_lane, shipped_each)
    spent = [0.0]

    def timed_loo(*a, **k):
        start = time.perf_counter()
        try:
            return loo(*a, **k)
        finally:
            spent[0] = time.perf_counter() - start

    fit_module.leave_one_out_scores = timed_loo
    names = ("one lane", "two lanes") if args.part == "all" else ("per-image steps in sequence", "per-image steps in lanes")
    runs = {name: {"fit": [], "calibration": [], "score": [], "threshold": set(), "scores": None} for name in names}
    with tempfile.TemporaryDirectory(prefix="spade-lanes-") as work:
        for rnd in range(args.rounds + 1):
            for name, (lanes_for, each) in zip(names, (baseline, (shipped, shipped_each))):
                use(lanes_for)
                use_each(each)
                gallery, out = os.path.join(work, name, "gallery"), os.path.join(work, name, "scores")
                shutil.rmtree(os.path.join(work, name), ignore_errors=True)
                start = time.perf_counter()
                manifest = fit_module.run_fit(config, args.data, gallery, [], lambda m: None)
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                summary = run_score(config, gallery, args.data, out, [], lambda m: None)
                score_s = time.perf_counter() - start
                run = runs[name]
                run["threshold"].add(round(manifest["thresholds"]["image"], 9))
                table = read_score_table(out).sort_by("uri")
                run["scores"] = np.asarray(table.column("image_score").to_pylist(), dtype=np.float64)
                print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name}: fit {fit_s:.2f} s (calibration "
                      f"{spent[0]:.2f} s), score {summary['rows']} images {score_s:.2f} s, image threshold "
                      f"{manifest['thresholds']['image']:.6f}", flush=True)
                if rnd:
                    run["fit"].append(fit_s)
                    run["calibration"].append(spent[0])
                    run["score"].append(score_s)
    use(shipped)
    use_each(shipped_each)
    med = {name: {key: statistics.median(runs[name][key]) for key in ("fit", "calibration", "score")} for name in names}
    for name in names:
        print(f"{name}: fit {med[name]['fit']:.2f} s, calibration {med[name]['calibration']:.2f} s, "
              f"score {med[name]['score']:.2f} s (medians)")
    thresholds = runs[names[0]]["threshold"] | runs[names[1]]["threshold"]
    scores_equal = np.allclose(runs[names[0]]["scores"], runs[names[1]]["scores"], rtol=1e-6, atol=1e-6)
    ratio = {key: med[names[0]][key] / med[names[1]][key] for key in ("calibration", "fit", "score")}
    print(f"{Path(args.data).name}, {Path(args.config).name}, part {args.part}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"RESULT calibration_speedup={ratio['calibration']:.3f} fit_speedup={ratio['fit']:.3f} "
          f"score_speedup={ratio['score']:.3f} thresholds_equal={int(len(thresholds) == 1)} "
          f"scores_equal={int(scores_equal)}")


if __name__ == "__main__":
    main()
