"""Exact correspondence of this checkout against another revision's, on real test images, in one process.

    python benchmarks/refinement.py --gallery runs/bottle-gallery --data ../shared/data/mvtec_ad_bottle --against 2a8031e

Loads `spade/scoring/correspondence.py` as it is at ``--against`` (git show) beside the current one, extracts
the features of ``--images`` test images spread over the set (batches of ``batch_size``), finds their K nearest
gallery images once, and runs both versions' `batch_layer_distances` on every layer of the config. Prints
milliseconds per image for each and the largest difference between their distances (0: identical results).
Last line: ``RESULT speedup=<against ms / current ms> max_abs_diff=<...>``. Gallery from `spade fit` with the
same config (`--config`, default configs/default.yaml).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade.config import load_config  # noqa: E402
from spade.features.backbone import FeatureExtractor  # noqa: E402
from spade.index.gallery import Gallery, with_gallery_settings  # noqa: E402
from spade.index.knn import nearest_images  # noqa: E402
from spade.io.images import preprocess  # noqa: E402
from spade.features.framing import framing_for  # noqa: E402
from spade.scoring import correspondence as current  # noqa: E402


def module_at(revision: str):
    """`spade.scoring.correspondence` as it is at ``revision``, loaded under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:spade/scoring/correspondence.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="spade-refinement-")) / "correspondence_at.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("correspondence_at", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder (its test/ images are used)")
    parser.add_argument("--against", required=True, help="a git revision whose correspondence module is the baseline")
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = load_config(args.config, {"num_threads": args.threads})
    baseline = module_at(args.against)
    gallery = Gallery.open(args.gallery)
    config = with_gallery_settings(config, gallery.manifest)
    files = sorted(glob.glob(f"{args.data}/test/*/*.*"))
    files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, args.images).round().astype(int))]
    extractor = FeatureExtractor(config)
    seconds = {"current": 0.0, "baseline": 0.0}
    worst = 0.0
    for start in range(0, len(files), config.batch_size):
        batch = torch.stack([preprocess(np.asarray(Image.open(f).convert("RGB")), config.resize, config.crop,
                                        config.mean, config.std,
                                        framing_for(config, fallback_size=(config.resize, config.resize)),
                                        config.brightness)
                             for f in files[start:start + config.batch_size]])
        features = extractor(batch)
        _, neighbours = nearest_images(gallery.index, features.embedding, config.k)
        for layer in config.layers:
            maps = features.pyramid[layer]
            b, c, h, w = maps.shape
            queries = np.ascontiguousarray(maps.reshape(b, c, h * w).transpose(0, 2, 1))
            out = {}
            for name, module in (("baseline", baseline), ("current", current)):
                began = time.perf_counter()
                out[name] = module.batch_layer_distances(queries, gallery.pyramid[layer], neighbours, config.kappa)
                seconds[name] += time.perf_counter() - began
            worst = max(worst, float(np.abs(out["baseline"] - out["current"]).max()))
    n = len(files)
    print(f"{Path(args.data).name}: {n} test images, layers {', '.join(config.layers)}: {args.against} "
          f"{seconds['baseline'] / n * 1000:.1f} ms/image, current {seconds['current'] / n * 1000:.1f} ms/image, "
          f"max |diff| {worst:.3g}")
    print(f"RESULT speedup={seconds['baseline'] / seconds['current']:.2f} max_abs_diff={worst:.3g}")


if __name__ == "__main__":
    main()
