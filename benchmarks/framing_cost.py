"""Scoring CPU time per image of framings, in one process, against a baseline config on the same machine.

    python benchmarks/framing_cost.py          # every layer exact on bottle (configs/exact.yaml, the baseline)
                                               # against the default on bottle, tire and the commutators, exact on
                                               # the commutators, the squeezed and the aspect frame

Each row fits a gallery in memory (the first ``--gallery`` train images; not timed), then times the scoring path of
``--images`` test images as a worker runs it: preprocess, features, kNN, correspondence, score map, back to the
original geometry, the image score's terms (patch and coreset banks are built before the timing: fit stores them).
CPU seconds (process time, all threads) per image are robust to other load on the machine; wall seconds are printed
too. The ratio column is against the first row. ``--rounds R`` times R passes: the first (cold: a bank's first
searches, its lazily packed panels) as before, and the median of all R, which RESULT then gives (a nightly run's
thousands of images pay the cold costs once). The last line is machine-readable:

    RESULT <label>=<ratio> ...
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade.config import IMAGE_SCORES, load_config  # noqa: E402
from spade.io.listing import fix_brightness  # noqa: E402
from spade.features.backbone import FeatureExtractor  # noqa: E402
from spade.features.framing import frame_size_for, framing_for  # noqa: E402
from spade.index.coreset import coreset_settings, memory_bank_for  # noqa: E402
from spade.index.gallery import Gallery  # noqa: E402
from spade.index.knn import build_index  # noqa: E402
from spade.index.patch_bank import patch_bank_for  # noqa: E402
from spade.io.images import decode_rgb, preprocess  # noqa: E402
from spade.scoring.batch import layer_queries, score_batch  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402
from spade.scoring.position_baseline import position_baseline  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_RUNS = (
    "exact (every layer exact, the default until now)=mvtec_ad_bottle:configs/exact.yaml",
    "default=mvtec_ad_bottle:configs/default.yaml",
    "squeezed=mvtec_ad_bottle:configs/default.yaml:framing=full",
    "default=mvtec3d_tire:configs/default.yaml",
    "default=kolektorsdd_commutator:configs/default.yaml",
    "exact=kolektorsdd_commutator:configs/exact.yaml",
    "aspect (one tile)=kolektorsdd_commutator:configs/default.yaml:framing=aspect",
)


def _paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp"))


@dataclass
class Scorer:
    """A config's scoring path over an in-memory gallery, as a worker runs it (`prepare`)."""

    config: object
    framing: object
    extractor: FeatureExtractor
    gallery: Gallery
    normals: dict
    test: list[Path]

    def tensors(self, paths: list[Path]):
        config = self.config
        rgbs = [decode_rgb(p.read_bytes()) for p in paths]
        return rgbs, torch.stack([preprocess(rgb, config.resize, config.crop, config.mean, config.std, self.framing,
                                             config.brightness)
                                  for rgb in rgbs])

    def score(self) -> list:
        """Score the test images as a worker does: preprocess, features, kNN, correspondence, map, back to the
        original geometry, the image score's terms; returns (map in the original geometry, image score) a test image."""
        out = []
        for start in range(0, len(self.test), self.config.batch_size):
            rgbs, batch = self.tensors(self.test[start:start + self.config.batch_size])
            for result, rgb in zip(score_batch(self.extractor(batch), self.gallery, self.config, normals=self.normals),
                                   rgbs):
                out.append((self.framing.to_original(result.score_map, (rgb.shape[1], rgb.shape[0])),
                            result.image_score))
        return out


def prepare(data: Path, spec: str, gallery_images: int, images: int) -> Scorer:
    """Fit a gallery in memory from the first ``gallery_images`` train images of ``data`` with the config ``spec``
    (``path[:key=value,...]``), its patch and coreset banks built (fit stores them: not a scoring cost)."""
    path, _, overrides = spec.partition(":")
    import yaml
    values = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in filter(None, overrides.split(",")))}
    config = fix_brightness(load_config(str(ROOT / path), values), str(data))[0]
    train, test = _paths(data / "train" / "good")[:gallery_images], _paths(data / "test")[:images]
    if config.frame_from_gallery:
        config = config.replace(frame_size=frame_size_for([Image.open(p).size for p in train], config.resize))
    framing = framing_for(config)
    extractor = FeatureExtractor(config)
    scorer = Scorer(config, framing, extractor, None, {}, test)
    embeddings, rows = [], {layer: [] for layer in config.layers}
    for start in range(0, len(train), config.batch_size):
        features = extractor(scorer.tensors(train[start:start + config.batch_size])[1])
        embeddings.append(features.embedding)
        for layer in config.layers:
            rows[layer].append(layer_queries(features.pyramid[layer]))
    # a hash of its own per row: banks are kept per process by gallery hash, and one shared by every row gave each set
    # the first row's patch bank (the commutators were timed against bottle's 2,140 vectors instead of their 7,649)
    identity = f"framing-cost {data} {spec} {gallery_images}"
    scorer.gallery = Gallery(str(data), {"feature_signature": config.feature_signature(), "gallery_hash": identity},
                             None, build_index(np.concatenate(embeddings)), {k: np.concatenate(v) for k, v in rows.items()})
    if config.uses_patch_bank:
        patch_bank_for(scorer.gallery, config, framing)
    for layer in config.coreset_layers:
        memory_bank_for(scorer.gallery, layer, **coreset_settings(config))
    # timing only: unit statistics for every term and mode, a flat position baseline for the residual term, and a
    # region level of 0 (every pixel above it: the region term labels the whole frame, its dearest case)
    normals = {term: {"mean": 0.0, "std": 1.0} for term in ("knn", "map_max", "map_top", "bank_max", "map_residual",
                                                             "region_excess")}
    normals["position_baseline"] = position_baseline(np.zeros((1, *framing.size), dtype=np.float32))
    normals["region_level"] = {"level": 0.0, "quantile": 0.995, "border": 16}
    normals["scores"] = {mode: {"mean": 0.0, "std": 1.0} for mode in IMAGE_SCORES}
    scorer.normals = normals
    return scorer


def run(data: Path, spec: str, gallery_images: int, images: int, rounds: int = 1) -> dict:
    """Time ``rounds`` passes over the test images: CPU and wall s per image of the first (cold: a bank's first
    searches, lazily packed panels) and the median of all passes."""
    scorer = prepare(data, spec, gallery_images, images)
    cpu, wall = [], []
    for _ in range(rounds):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        scorer.score()
        cpu.append((time.process_time() - start_cpu) / len(scorer.test))
        wall.append((time.perf_counter() - start_wall) / len(scorer.test))
    return {"cpu": cpu[0], "wall": wall[0], "cpu_median": statistics.median(cpu), "wall_median": statistics.median(wall),
            "frame": "x".join(map(str, scorer.framing.size)), "tiles": len(scorer.framing.tiles)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="label=set:config[:key=value,...] (repeatable; first = baseline)")
    parser.add_argument("--gallery", type=int, default=250, help="train images in the gallery (default 250: every one "
                        "of the shared sets'; a coreset bank's size, unlike the K nearest frames, follows the gallery's)")
    parser.add_argument("--images", type=int, default=16, help="test images timed (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the test images (default 1, the cold first "
                        "pass alone); with more, the table adds their median and RESULT gives its ratios")
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    warm = args.rounds > 1
    extra = " median CPU s / image | median ratio |" if warm else ""
    print(f"| run | set | frame (tiles) | CPU s / image | wall s / image | CPU ratio to the first row |{extra}")
    print("|---|---|---|---|---|---|" + ("---|---|" if warm else ""))
    base, base_median, results = None, None, []
    for item in args.run or DEFAULT_RUNS:
        label, _, rest = item.partition("=")
        name, _, spec = rest.partition(":")
        found = run(SHARED / name if not Path(name).is_dir() else Path(name), spec, args.gallery, args.images,
                    max(1, args.rounds))
        base, base_median = base or found["cpu"], base_median or found["cpu_median"]
        ratio, median_ratio = found["cpu"] / base, found["cpu_median"] / base_median
        results.append((label, name, median_ratio if warm else ratio))
        columns = f" {found['cpu_median']:.3f} | {median_ratio:.2f} |" if warm else ""
        print(f"| {label} | {name} | {found['frame']} ({found['tiles']}) | {found['cpu']:.3f} | {found['wall']:.3f} | "
              f"{ratio:.2f} |{columns}", flush=True)
    print("RESULT " + " ".join(f"{label.split(' ')[0]}:{name}={ratio:.2f}" for label, name, ratio in results[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
