"""The backbone's CPU runtimes give the same features: channels-last (the default) against the NCHW reference."""
import numpy as np
import pytest
import torch

from spade.config import SpadeConfig
from spade.features.backbone import FeatureExtractor
from spade.features.framing import framing_for
from spade.io.images import preprocess
from spade.io.samples import normal_surface


def frames(config: SpadeConfig, count: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    framing = framing_for(config)
    images = [normal_surface(rng, config.frame_size[0] if config.frame_size else 256,
                             config.frame_size[1] if config.frame_size else 256) for _ in range(count)]
    return torch.stack([preprocess(image, config.resize, config.crop, config.mean, config.std, framing) for image in images])


@pytest.mark.parametrize("config", [
    SpadeConfig(frame_size=(256, 640)),  # the default: EfficientNet-Lite0 (package weights), 3 tiles, 3x3 aggregation
    SpadeConfig(backbone="resnet18", weights="random", framing="crop", resize=256, crop=224, feature_aggregation=1),
], ids=["lite0-tiles", "resnet18-crop"])
def test_channels_last_matches_the_nchw_reference(config):
    batch = frames(config)
    fast = FeatureExtractor(config)(batch)
    reference = FeatureExtractor(config.replace(feature_runtime="eager"))(batch)
    assert np.abs(fast.embedding - reference.embedding).max() <= 1e-4
    for layer in config.layers:
        assert fast.pyramid[layer].shape == reference.pyramid[layer].shape
        assert np.abs(fast.pyramid[layer] - reference.pyramid[layer]).max() <= 1e-4, layer
        assert fast.pyramid[layer].flags["C_CONTIGUOUS"]


def test_an_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="feature_runtime must be one of channels_last, eager"):
        SpadeConfig(feature_runtime="onnx")
