"""Worker memory of one `spade score` routed to many galleries: 1 route against 20, at the default open_galleries.

A synthetic plant (`spade.io.samples.write_plant_archive`: one line per gallery, each its own texture, 128x128
images, ``--train`` normal images a line) is fitted by one routed `spade fit` in a process of its own (one gallery per line), then
scored by one routed `spade score` in a fresh process with the local runner in multi-processing mode
(``--direct_running_mode=multi_processing --direct_num_workers=1``): the SDK worker that opens the galleries is a
child process, whose peak RSS (``ru_maxrss``) is what this measures, beside the launcher's. resnet18 with random
weights (memory, not accuracy). The stated cap: the worker's peak with N routes stays under its peak with 1 route
plus ``open_galleries`` x the largest gallery's in-memory size (`Gallery.resident_bytes`) plus 64 MB of Beam's
per-branch state. Prints one line per size, then

    RESULT worker_1=<MB> worker_N=<MB> cap=<MB> within_cap=<yes|no> launcher_N=<MB>

    python benchmarks/routed_memory.py [--routes 20] [--train 40] [--work /tmp/spade-routed-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEAM = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=1"]


def config():
    from spade.config import SpadeConfig

    return SpadeConfig(backbone="resnet18", weights="random", resize=128, crop=128, framing="crop", k=3, batch_size=8,
                       calibration_images=10, num_threads=1, feature_aggregation=1, image_score="knn")


def one_score(routes: int, train: int, work: str) -> dict:
    """In a child process: fit ``routes`` galleries in one routed fit (in process), then score them in one routed run
    whose SDK worker is a child; peak RSS of both."""
    from spade.index.gallery import Gallery
    from spade.io.samples import PlantSpec, write_plant_archive
    from pipelines.score import Nightly, run_score

    root = os.path.join(work, f"plant-{routes}")
    shutil.rmtree(root, ignore_errors=True)
    lines = tuple(f"L{i:02d}" for i in range(routes))
    normals, archive = write_plant_archive(root, PlantSpec(lines=lines, train=train, good_per_night=6,
                                                           defective_per_night=2, size=128))
    galleries = os.path.join(root, "galleries", "{line}-{camera}")
    fitted = subprocess.run([sys.executable, __file__, "--fit", normals, galleries], capture_output=True, text=True,
                            cwd=ROOT)  # in its own process: this one's memory is the scoring run's alone
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    resident = max(Gallery.open(os.path.join(root, "galleries", f"{line}-top")).resident_bytes() for line in lines)
    started = time.perf_counter()
    summary = run_score(config(), galleries, archive, os.path.join(root, "scores"), BEAM, lambda m: None,
                        Nightly(day="2026-12-01"))
    return {"routes": routes, "rows": summary["rows"], "seconds": time.perf_counter() - started,
            "gallery_resident_mb": resident / 2**20,
            "launcher_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=20)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--work", default="/tmp/spade-routed-memory")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fit", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit:
        from pipelines.fit import run_fit

        run_fit(config(), args.fit[0], args.fit[1], ["--runner=FnApiRunner"], lambda m: None)
        return
    if args.one:
        print(json.dumps(one_score(args.one, args.train, args.work)))
        return
    from spade.config import SpadeConfig

    print(f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for routes in (1, args.routes):
        out = subprocess.run([sys.executable, __file__, "--one", str(routes), "--train", str(args.train), "--work",
                              args.work], check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['routes']:>3} route(s): {r['rows']} rows in {r['seconds']:.1f}s; worker peak RSS {r['worker_peak_mb']:.0f} MB, "
              f"launcher {r['launcher_peak_mb']:.0f} MB; largest gallery in memory {r['gallery_resident_mb']:.2f} MB",
              flush=True)
    one, many = rows
    cap = one["worker_peak_mb"] + SpadeConfig().open_galleries * many["gallery_resident_mb"] + 64
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"RESULT worker_1={one['worker_peak_mb']:.0f} worker_{many['routes']}={many['worker_peak_mb']:.0f} "
          f"cap={cap:.0f} within_cap={'yes' if many['worker_peak_mb'] <= cap else 'no'} "
          f"launcher_{many['routes']}={many['launcher_peak_mb']:.0f}")


if __name__ == "__main__":
    main()
