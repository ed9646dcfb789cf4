"""What the launcher pays to construct and submit `fit` and `score` as the archive grows.

For 10^3, 10^4 and 10^5 inputs (empty files on fsspec's in-memory filesystem, laid out in 100 date
folders) each launch runs in a fresh process: `run_fit` / `run_score` exactly as `spade` calls them,
with ``--runner=pipelines.runner.GraphOnlyRunner``, which serializes the job graph as a runner
submitting it to a service does and stops there. Printed per pipeline and size: launcher wall time
(from the call to submission, after one warm-up launch on one input), the process's peak RSS and its
growth during the timed launch, and the
serialized graph's size; then

    RESULT graph_growth=<graph bytes at the largest size / at 10^3> launch_growth=<launch seconds, same ratio>

(the larger of fit's and score's ratios). Targets: graph_growth <= 1.1, launch_growth < 2.
``--smoke`` does 10^3 and 10^4 only.

    .venv/bin/python benchmarks/launch.py [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _config():
    from spade.config import SpadeConfig

    # the archive's inputs are empty files: nothing to fix a frame size or a brightness from
    return SpadeConfig(backbone="resnet18", weights="random", k=3, batch_size=8, calibration_images=2, num_threads=1,
                       framing="crop", brightness="keep")


def one_launch(what: str, count: int, gallery: str, workdir: str) -> dict:
    """Runs in a child process: lay out ``count`` inputs in memory, then time one launch of ``what``."""
    import fsspec

    from pipelines.fit import run_fit
    from pipelines.runner import JobSubmitted
    from pipelines.score import Nightly, run_score

    fs = fsspec.filesystem("memory")
    for i in range(count):
        fs.pipe(f"/archive/date=2026-11-{i % 100:03d}/{i:07d}.png", b"")
    fs.pipe("/warm-up/0.png", b"")
    config, args = _config(), ["--runner=pipelines.runner.GraphOnlyRunner"]
    quiet = lambda message: None  # noqa: E731

    def launch(images: str) -> int:
        try:
            if what == "fit":
                run_fit(config, images, os.path.join(workdir, "fit-gallery"), args, quiet)
            else:
                run_score(config, gallery, images, os.path.join(workdir, "nightly"), args, quiet,
                          Nightly(day="2026-11-28", since="2026-11-01"))
        except JobSubmitted as submitted:
            return submitted.graph_bytes
        raise RuntimeError("GraphOnlyRunner did not stop the launch")

    launch("memory://warm-up/*.png")  # first-call costs (lazy imports, building the backbone once) are not the archive's
    before = _rss_mb()
    started = time.perf_counter()
    graph = launch("memory://archive/**/*.png")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"what": what, "inputs": count, "seconds": seconds, "graph_bytes": graph, "peak_rss_mb": peak,
            "launch_rss_growth_mb": max(0.0, peak - before)}


def _fit_small_gallery(workdir: str) -> str:
    from spade.io.samples import SampleSpec, write_sample_dataset
    from pipelines.fit import run_fit

    data = write_sample_dataset(os.path.join(workdir, "sample"), SampleSpec(train=4, test_good=1, test_per_defect=1))
    gallery = os.path.join(workdir, "gallery")
    run_fit(_config(), f"{data}/train/good", gallery, ["--runner=FnApiRunner"], lambda message: None)
    return gallery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="10^3 and 10^4 inputs only")
    parser.add_argument("--one", nargs=4, metavar=("WHAT", "COUNT", "GALLERY", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        what, count, gallery, workdir = args.one
        print(json.dumps(one_launch(what, int(count), gallery, workdir)))
        return
    sizes = [1_000, 10_000] if args.smoke else [1_000, 10_000, 100_000]
    with tempfile.TemporaryDirectory(prefix="spade-launch-") as workdir:
        gallery = _fit_small_gallery(workdir)
        rows = []
        for what in ("fit", "score"):
            for count in sizes:
                out = subprocess.run([sys.executable, __file__, "--one", what, str(count), gallery, workdir],
                                     check=True, capture_output=True, text=True, cwd=ROOT)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'pipeline':<8} {'inputs':>8} {'launch s':>9} {'graph bytes':>12} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    for row in rows:
        print(f"{row['what']:<8} {row['inputs']:>8} {row['seconds']:>9.2f} {row['graph_bytes']:>12} "
              f"{row['peak_rss_mb']:>12.0f} {row['launch_rss_growth_mb']:>14.1f}")
    by = {(r["what"], r["inputs"]): r for r in rows}
    graph_growth = max(by[w, sizes[-1]]["graph_bytes"] / by[w, sizes[0]]["graph_bytes"] for w in ("fit", "score"))
    launch_growth = max(by[w, sizes[-1]]["seconds"] / by[w, sizes[0]]["seconds"] for w in ("fit", "score"))
    print(f"RESULT graph_growth={graph_growth:.3f} launch_growth={launch_growth:.2f}")


if __name__ == "__main__":
    main()
