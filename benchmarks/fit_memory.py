"""Peak RSS of `spade fit` as the gallery grows: the launcher and a worker process, 200 vs 2,000 images.

Each fit runs in a fresh process with the local runner in multi-processing mode
(``--direct_running_mode=multi_processing --direct_num_workers=1``): the SDK worker that reads, extracts and
writes pyramid shards is a child process, the launcher (which also runs the FnApiRunner's shuffle and builds
the gallery's index and manifest) is the parent. Peak RSS: ``ru_maxrss`` of the launcher, and of its
largest child (the worker). Images: the synthetic textured plates of `spade.io.samples` (distinct images,
128x128), resnet18 with random weights, crop 128, float16 features (~230 KB of pyramid per image, so
2,000 images carry ~0.45 GB of pyramid). Prints one line per size, then

    RESULT launcher_growth=<peak RSS at the larger size / smaller> worker_growth=<same for the worker>

Target: both < 1.3. ``--smoke``: 50 and 200 images.

    .venv/bin/python benchmarks/fit_memory.py [--smoke]
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


def one_fit(count: int, workdir: str) -> dict:
    """Runs in a child process: write ``count`` normal images, fit a gallery on them, report peak RSS."""
    from spade.config import SpadeConfig
    from spade.io.samples import SampleSpec, write_sample_dataset
    from pipelines.fit import run_fit

    data = write_sample_dataset(os.path.join(workdir, f"data-{count}"), SampleSpec(size=128, train=count, test_good=1,
                                                                                   test_per_defect=1))
    config = SpadeConfig(backbone="resnet18", weights="random", resize=128, crop=128, feature_dtype="float16",
                         k=5, batch_size=8, calibration_images=2, num_threads=1)
    args = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=1"]
    started = time.perf_counter()
    manifest = run_fit(config, f"{data}/train/good", os.path.join(workdir, f"gallery-{count}"), args, lambda m: None)
    seconds = time.perf_counter() - started
    pyramid_bytes = sum(os.path.getsize(os.path.join(folder, name))
                        for folder, _, names in os.walk(os.path.join(workdir, f"gallery-{count}", "pyramid")) for name in names)
    return {"images": manifest["num_images"], "seconds": seconds, "pyramid_mb": pyramid_bytes / 2**20,
            "launcher_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="50 and 200 images")
    parser.add_argument("--one", nargs=2, metavar=("COUNT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_fit(int(args.one[0]), args.one[1])))
        return
    sizes = (50, 200) if args.smoke else (200, 2000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="spade-fit-memory-") as workdir:
        for count in sizes:
            out = subprocess.run([sys.executable, __file__, "--one", str(count), workdir], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"fit {rows[-1]['images']:>5} images: {rows[-1]['seconds']:7.1f} s, pyramid {rows[-1]['pyramid_mb']:7.1f} MB, "
                  f"launcher peak RSS {rows[-1]['launcher_peak_mb']:7.0f} MB, worker peak RSS {rows[-1]['worker_peak_mb']:7.0f} MB",
                  flush=True)
    small, large = rows
    print(f"RESULT launcher_growth={large['launcher_peak_mb'] / small['launcher_peak_mb']:.3f} "
          f"worker_growth={large['worker_peak_mb'] / small['worker_peak_mb']:.3f}")


if __name__ == "__main__":
    main()
