"""The ImageNet CNN and its feature pyramid: global embedding + layer1..3 maps."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision

from spade.config import SpadeConfig
from spade.weights import ResolvedWeights, resolve_weights

RESNET_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
)


@dataclass
class Features:
    """A batch's features: ``embedding`` (B, D) and ``pyramid`` {layer: (B, C, H, W)}, float32."""

    embedding: np.ndarray
    pyramid: dict[str, np.ndarray]


def build_backbone(name: str, weights: ResolvedWeights) -> torch.nn.Module:
    """A torchvision ResNet-family model in eval mode carrying ``weights``."""
    if name not in RESNET_BACKBONES:
        raise ValueError(f"backbone {name!r} is not supported; use one of {', '.join(RESNET_BACKBONES)}")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # `weights: random` must be the same network in fit, score and every worker
        model = torchvision.models.get_model(name, weights=None)
    if weights.state_dict is not None:
        missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"weights {weights.source} do not fit {name}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}; "
                "check that `backbone` names the architecture the weights were trained for"
            )
    return model.eval()


class FeatureExtractor:
    """Runs the backbone once per batch and returns the pooled embedding and the chosen layer maps."""

    def __init__(self, config: SpadeConfig, weights: ResolvedWeights | None = None):
        self.config = config
        self.weights = weights if weights is not None else resolve_weights(config.backbone, config.weights)
        self.model = build_backbone(config.backbone, self.weights)
        self.layers = tuple(config.layers)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Features:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(batch))))
        maps: dict[str, torch.Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(m, name)(x)
            maps[name] = x
        embedding = torch.flatten(m.avgpool(x), 1)
        return Features(
            embedding=embedding.numpy().astype(np.float32, copy=False),
            pyramid={name: maps[name].numpy().astype(np.float32, copy=False) for name in self.layers},
        )

    def classify(self, batch: torch.Tensor) -> np.ndarray:
        """ImageNet logits (B, 1000); used to prove the weights are really ImageNet-trained."""
        with torch.inference_mode():
            return self.model(batch).numpy()
