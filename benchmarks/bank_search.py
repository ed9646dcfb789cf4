"""faiss's flat search on the shapes scoring asks of it: its own choice between a GEMM and one query at a time
(`distance_compute_blas_threshold` 128,000 queries x dimensions) against ours (`spade.index.coreset.BLAS_THRESHOLD`).

Random vectors of the banks' shapes (the layer banks of configs/approximate.yaml and the default's capped layer-1 bank,
the patch bank, the gallery's image embeddings), for query counts of one image up to a batch of 8, best of
``--repeats``, alternately in one process. Prints ms per search under each threshold and their ratio, and how
far the two paths' nearest neighbours differ (the two compute distances with different rounding, so near-ties can
go either way: the share of queries whose neighbour differs, and the largest difference of the winners' distances
recomputed directly, as `MemoryBank.distances` reports them), then

    RESULT one_image_layer1=<faiss's / ours, 4,096 layer-1 queries, 8,192-vector bank>
           worst=<smallest ratio where the thresholds choose different paths> max_distance_diff=<largest>

(where both thresholds choose the same path the ratio is the VM's noise.)

    python benchmarks/bank_search.py [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAISS_DEFAULT = 128_000

# (what, bank vectors, dimensions, queries per image)
SHAPES = (("layer-1 bank, approximate (1 % of metal_plate)", 2212, 24, 4096),
          ("layer-1 bank, default (capped)", 8192, 24, 4096),
          ("layer-2 bank", 553, 48, 1024),
          ("layer-3 bank", 138, 120, 256),
          ("patch bank (layer2+3)", 553, 168, 1024),
          ("image embeddings, 209-image gallery", 209, 1280, 1),
          ("image embeddings, 20,000-image gallery", 20000, 1280, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import faiss

    from spade.index.coreset import BLAS_THRESHOLD

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}; faiss {faiss.__version__}, {args.threads} threads")
    ratios, worst_diff, one_image = [], 0.0, None
    for what, size, dims, per_image in SHAPES:
        index = faiss.IndexFlatL2(dims)
        vectors = rng.standard_normal((size, dims), dtype=np.float32)
        index.add(vectors)
        for images in (1, 2, 8):
            queries = rng.standard_normal((per_image * images, dims), dtype=np.float32)
            best, ids = {}, {}
            for _ in range(args.repeats):
                for name, threshold in (("faiss", FAISS_DEFAULT), ("ours", BLAS_THRESHOLD)):
                    faiss.cvar.distance_compute_blas_threshold = threshold
                    started = time.perf_counter()
                    _, ids[name] = index.search(queries, 1)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
            ratio = best["faiss"] / best["ours"]
            paths = ["GEMM" if len(queries) * dims >= threshold else "one by one"
                     for threshold in (FAISS_DEFAULT, BLAS_THRESHOLD)]
            if paths[0] != paths[1]:
                ratios.append(ratio)
            differ = float(np.mean(ids["faiss"][:, 0] != ids["ours"][:, 0]))
            diff = max(float(np.abs(np.linalg.norm(vectors[ids["faiss"][:, 0]] - queries, axis=1)
                                    - np.linalg.norm(vectors[ids["ours"][:, 0]] - queries, axis=1)).max()), 0.0)
            worst_diff = max(worst_diff, diff)
            if size == 8192 and images == 1:
                one_image = ratio
            print(f"{what}, {size}x{dims}, {len(queries)} queries ({images} image(s)): faiss's threshold "
                  f"{best['faiss'] * 1000:.2f} ms ({paths[0]}), ours {best['ours'] * 1000:.2f} ms ({paths[1]}, {ratio:.2f}x); "
                  f"neighbour differs for "
                  f"{differ:.2%} of queries, distances by {diff:.1e}", flush=True)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"RESULT one_image_layer1={one_image:.2f} worst={min(ratios, default=1.0):.2f} "
          f"max_distance_diff={worst_diff:.1e}")


if __name__ == "__main__":
    main()
