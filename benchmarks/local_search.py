"""What the local search beside the layer-1 bank costs: the pixel correspondence with and without it, one process.

    python benchmarks/local_search.py                    # the four shared sets: radius/block 2/4 (the default) and 1/8
    python benchmarks/local_search.py --data ../shared/data/mpdd_metal_plate --setting 1/8 --setting 2/4 --rounds 5

For each set: the default config's features of the gallery (train/good) and of ``--images`` test images, then
`spade.scoring.batch.layer_distance_maps` (kNN neighbours given, the coreset bank built before the clock) timed
without the local search (``approximate_local_radius: 0``) and with each ``--setting`` radius/block
(``approximate_local_radius``/``approximate_local_block``), in alternating rounds; printed: wall ms per image
(median of the rounds), the ratio to no search, and the local search alone (`spade.scoring.local_search`) per image.
Accuracy: `benchmarks/accuracy.py --config "configs/default.yaml:approximate_local_radius=1,approximate_local_block=8"`.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from image_decision import SETS, SHARED, _extract, _images, _rows  # noqa: E402
from spade.config import load_config  # noqa: E402
from spade.features.backbone import FeatureExtractor  # noqa: E402
from spade.features.framing import frame_size_for, framing_for  # noqa: E402
from spade.index.gallery import Gallery  # noqa: E402
from spade.index.knn import build_index, nearest_images  # noqa: E402
from spade.io.listing import fix_brightness  # noqa: E402
from spade.scoring.batch import layer_distance_maps  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402
from spade.scoring.local_search import local_window_distances  # noqa: E402
from PIL import Image  # noqa: E402


def prepare(root: Path, images: int):
    config = fix_brightness(load_config(str(ROOT / "configs" / "default.yaml")), str(root))[0]  # as fit fixes it
    train, test = _images(root / "train" / "good"), _images(root / "test")
    config = config.replace(frame_size=frame_size_for([Image.open(p).size for p in train[:64]], config.resize))
    framing = framing_for(config)
    extractor = FeatureExtractor(config)
    g_emb, g_pyr, _ = _extract(train, extractor, framing, config)
    picked = [test[i] for i in np.linspace(0, len(test) - 1, num=min(images, len(test))).round().astype(int)]
    t_emb, t_pyr, _ = _extract(picked, extractor, framing, config)
    gallery = Gallery(str(root), {"feature_signature": config.feature_signature(), "gallery_hash": root.name}, None,
                      build_index(g_emb), _rows(g_pyr))
    neighbours = nearest_images(gallery.index, t_emb, config.k)[1]
    return config, gallery, t_pyr, neighbours


def timed_maps(config, gallery, pyramid, neighbours) -> float:
    started = time.perf_counter()
    for start in range(0, len(neighbours), config.batch_size):
        part = slice(start, start + config.batch_size)
        layer_distance_maps({k: v[part] for k, v in pyramid.items()}, gallery, neighbours[part], config)
    return (time.perf_counter() - started) / len(neighbours)


def timed_local(config, gallery, pyramid, neighbours, radius: int, block: int) -> float:
    layer = config.coreset_layers[0]
    started = time.perf_counter()
    for i in range(len(neighbours)):
        local_window_distances(pyramid[layer][i], gallery.pyramid[layer][neighbours[i]], radius, block)
    return (time.perf_counter() - started) / len(neighbours)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="MVTec-layout folder (repeatable); default: the shared sets")
    parser.add_argument("--setting", action="append", help="radius/block against no local search (repeatable; "
                        "default 2/4, the default config's, and 1/8, the blocks before session 43)")
    parser.add_argument("--images", type=int, default=24, help="test images timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    settings = [(0, 0)] + [tuple(int(v) for v in s.split("/")) for s in (args.setting or ["2/4", "1/8"])]
    sets = [Path(d) for d in args.data] if args.data else [SHARED / s for s in SETS if (SHARED / s).exists()]
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| set | frame | radius / block | correspondence ms / image | ratio to no search | local search alone ms / image |")
    print("|---|---|---|---|---|---|")
    for root in sets:
        config, gallery, pyramid, neighbours = prepare(root, args.images)
        timed_maps(config, gallery, {k: v[:2] for k, v in pyramid.items()}, neighbours[:2])  # the coreset bank built before the clock
        runs = {s: [] for s in settings}
        for _ in range(args.rounds):
            for radius, block in runs:
                runs[radius, block].append(timed_maps(config.replace(approximate_local_radius=radius,
                                                                     approximate_local_block=max(1, block)),
                                                      gallery, pyramid, neighbours))
        base = float(np.median(runs[0, 0]))
        frame = "x".join(str(v) for v in framing_for(config).size)
        for (radius, block), times in runs.items():
            alone = f"{timed_local(config, gallery, pyramid, neighbours, radius, block) * 1e3:.1f}" if radius else "—"
            print(f"| {root.name} | {frame} | {f'{radius} / {block}' if radius else 'no search'} | "
                  f"{np.median(times) * 1e3:.1f} | {np.median(times) / base:.2f} | {alone} |", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
