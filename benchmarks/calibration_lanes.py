"""Leave-one-out calibration in two lanes against one, inside `spade fit`, alternating in one process.

    python benchmarks/calibration_lanes.py                                    # metal_plate, default config, 3 rounds
    python benchmarks/calibration_lanes.py --data ../shared/data/mvtec_ad_bottle --rounds 2

Each round runs the whole `run_fit` call `spade fit` makes twice: once with `spade.scoring.calibration.calibration_lanes`
replaced by one lane of every thread (the code before the lanes: the baseline), once as shipped (two lanes of half the
threads). A warm-up round is not kept. Printed: fit and calibration seconds per run, their medians, the ratios
(baseline over lanes) and whether the image thresholds agree. The last line is machine-readable:

    RESULT calibration_speedup=<baseline / lanes> fit_speedup=<...> thresholds_equal=<0|1>
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.fit as fit_module  # noqa: E402
import spade.scoring.calibration as calibration  # noqa: E402
from spade.config import load_config  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def one_lane(num_threads: int) -> tuple[int, int]:
    """The baseline: one batch at a time with every thread."""
    return 1, num_threads if num_threads > 0 else (os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "mpdd_metal_plate"), help="an MVTec-layout folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    config = load_config(args.config)
    shipped, loo = calibration.calibration_lanes, calibration.leave_one_out_scores
    spent = [0.0]

    def timed_loo(*a, **k):
        start = time.perf_counter()
        try:
            return loo(*a, **k)
        finally:
            spent[0] = time.perf_counter() - start

    fit_module.leave_one_out_scores = timed_loo
    runs = {"one lane": {"fit": [], "calibration": [], "threshold": set()},
            "two lanes": {"fit": [], "calibration": [], "threshold": set()}}
    with tempfile.TemporaryDirectory(prefix="spade-lanes-") as work:
        for rnd in range(args.rounds + 1):
            for name, lanes in (("one lane", one_lane), ("two lanes", shipped)):
                calibration.calibration_lanes = lanes
                gallery = os.path.join(work, "gallery")
                shutil.rmtree(gallery, ignore_errors=True)
                start = time.perf_counter()
                manifest = fit_module.run_fit(config, args.data, gallery, [], lambda m: None)
                wall = time.perf_counter() - start
                runs[name]["threshold"].add(round(manifest["thresholds"]["image"], 9))
                print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name}: fit {wall:.2f} s, calibration "
                      f"{spent[0]:.2f} s, image threshold {manifest['thresholds']['image']:.6f}", flush=True)
                if rnd:
                    runs[name]["fit"].append(wall)
                    runs[name]["calibration"].append(spent[0])
    calibration.calibration_lanes = shipped
    med = {name: {key: statistics.median(run[key]) for key in ("fit", "calibration")} for name, run in runs.items()}
    for name, values in med.items():
        print(f"{name}: fit median {values['fit']:.2f} s, calibration median {values['calibration']:.2f} s")
    equal = runs["one lane"]["threshold"] == runs["two lanes"]["threshold"] and len(runs["one lane"]["threshold"]) == 1
    print(f"{Path(args.data).name}, {Path(args.config).name}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"RESULT calibration_speedup={med['one lane']['calibration'] / med['two lanes']['calibration']:.3f} "
          f"fit_speedup={med['one lane']['fit'] / med['two lanes']['fit']:.3f} thresholds_equal={int(equal)}")


if __name__ == "__main__":
    main()
