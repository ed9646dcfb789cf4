"""The ImageNet CNN and its feature pyramid: global embedding + layer1..3 maps.

Two families: torchvision ResNets (pyramid = ``layer1``..``layer4``, embedding = the average-pooled
``layer4`` output) and timm EfficientNets (``tf_efficientnet_lite0``, ``tf_efficientnet_lite2``; pyramid = the last
block at strides 4, 8, 16 and 32, named ``layer1``..``layer4`` so configs read the same; embedding = the
average-pooled 1280-channel conv head, the classifier's input). timm is imported only when a timm
backbone is asked for.
"""
from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torchvision

from spade.config import SpadeConfig, stable_hash
from spade.features.framing import TiledFraming
from spade.features.runtime import PyramidNet, make_runtime, resolve_device
from spade.features.weights import ResolvedWeights, check_preprocessing, resolve_weights

RESNET_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
)
TIMM_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
SUPPORTED_BACKBONES = RESNET_BACKBONES + TIMM_BACKBONES
LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


@dataclass
class Features:
    """A batch's features: ``embedding`` (B, D) and ``pyramid`` {layer: (B, C, H, W)}, float32."""

    embedding: np.ndarray
    pyramid: dict[str, np.ndarray]


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ImportError(
            "backbones " + ", ".join(TIMM_BACKBONES) + " need timm: `pip install timm` "
            "(or choose a torchvision backbone: " + ", ".join(RESNET_BACKBONES) + ")"
        ) from None
    return timm


def _create_model(name: str) -> torch.nn.Module:
    if name in RESNET_BACKBONES:
        return torchvision.models.get_model(name, weights=None)
    if name in TIMM_BACKBONES:
        return _import_timm().create_model(name, pretrained=False)
    raise ValueError(f"backbone {name!r} is not supported; use one of {', '.join(SUPPORTED_BACKBONES)}")


def build_backbone(name: str, weights: ResolvedWeights) -> torch.nn.Module:
    """A torchvision ResNet-family or timm EfficientNet model in eval mode carrying ``weights``."""
    if name not in SUPPORTED_BACKBONES:
        raise ValueError(f"backbone {name!r} is not supported; use one of {', '.join(SUPPORTED_BACKBONES)}")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # `weights: random` must be the same network in fit, score and every worker
        model = _create_model(name)
    if weights.state_dict is not None:
        head = ("fc.", "classifier.")
        missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(head)]
        if missing or unexpected:
            raise ValueError(
                f"weights {weights.source} do not fit {name}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}; "
                "check that `backbone` names the architecture the weights were trained for"
            )
    return model.eval()


def _timm_taps(model: torch.nn.Module) -> dict[int, str]:
    """{block index: layer name}: the last block at each of the strides 4, 8, 16, 32."""
    taps = {}
    by_stride = {info["reduction"]: info["module"] for info in model.feature_info}
    for layer, stride in LAYER_STRIDES.items():
        module = by_stride.get(stride)
        if module is None or not module.startswith("blocks."):
            raise ValueError(f"{type(model).__name__} has no block at stride {stride} for {layer}")
        taps[int(module.split(".")[1])] = layer
    return taps


def aggregate_neighbourhood(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Each position's features averaged over its ``size``² neighbourhood (stride 1, same map size):
    PatchCore's local aggregation, so a feature describes a patch rather than a point. At the map's
    border only the positions inside the map are averaged. ``size`` 1 returns the maps unchanged."""
    if size <= 1:
        return maps
    # separable sums of shifted copies (what avg_pool2d with count_include_pad=False computes, to float rounding),
    # 4-9x faster than torch's CPU avg_pool2d on a batch's layer maps
    reach = size // 2
    padded = torch.nn.functional.pad(maps, (reach, reach, reach, reach))
    height, width = maps.shape[-2:]
    rows = padded[..., 0:height, :].clone()
    for i in range(1, size):
        rows += padded[..., i:i + height, :]
    sums = rows[..., 0:width].contiguous()
    for j in range(1, size):
        sums += rows[..., j:j + width]
    return sums.div_(_window_counts(height, reach, maps.dtype)[:, None] * _window_counts(width, reach, maps.dtype)[None, :])


def _window_counts(length: int, reach: int, dtype: torch.dtype) -> torch.Tensor:
    """How many positions of [i - reach, i + reach] lie inside [0, length), for each i."""
    index = torch.arange(length)
    return ((index + reach).clamp(max=length - 1) - (index - reach).clamp(min=0) + 1).to(dtype)


class FeatureExtractor:
    """Runs the backbone once per batch and returns the pooled embedding and the chosen layer maps."""

    def __init__(self, config: SpadeConfig, weights: ResolvedWeights | None = None):
        self.config = config
        self.weights = weights if weights is not None else resolve_weights(config.backbone, config.weights)
        check_preprocessing(self.weights, config.mean, config.std, config_name=f"the config (weights: {config.weights})")
        self.layers = tuple(config.layers)
        self._model: torch.nn.Module | None = None
        self._model_lock = threading.Lock()
        self.device = resolve_device(config.device)
        timm = importlib.metadata.version("timm") if config.backbone in TIMM_BACKBONES else None
        identity = {"backbone": config.backbone, "weights": self.weights.sha256, "layers": list(self.layers),
                    "torch": torch.__version__, "timm": timm}
        self.runtime = make_runtime(config.feature_runtime, self._pyramid_net, self.layers, stable_hash(identity),
                                    self.device, config.feature_precision)
        self._framings: dict[tuple[int, int], TiledFraming | None] = {}

    @property
    def model(self) -> torch.nn.Module:
        """The torch backbone with its weights, built on first use (OpenVINO's runtime needs it only to convert)."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = build_backbone(self.config.backbone, self.weights)
        return self._model

    def _pyramid_net(self) -> PyramidNet:
        taps = _timm_taps(self.model) if self.config.backbone in TIMM_BACKBONES else None
        return PyramidNet(self.model, self.layers, taps)

    def _framing(self, size: tuple[int, int]) -> TiledFraming | None:
        """The tiles of a frame of ``size`` (the framing's frame size, whatever the config records), None when the
        framing gives one tile."""
        if self.config.framing != "tiles":
            return None
        if size not in self._framings:
            framing = TiledFraming(size, self.config.tile_size, self.config.tile_overlap)
            self._framings[size] = framing if len(framing.tiles) > 1 else None
        return self._framings[size]

    def _tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embedding and aggregated pyramid maps of (n, 3, th, tw) tiles, ``batch_size`` tiles per forward pass
        (memory bounded per tile, however long a frame)."""
        step = max(1, self.config.batch_size)
        embeddings, pyramids = [], {name: [] for name in self.layers}
        for start in range(0, tiles.shape[0], step):
            embedding, maps = self.runtime(tiles[start:start + step])
            embeddings.append(embedding)
            for name in self.layers:
                pyramids[name].append(aggregate_neighbourhood(maps[name], self.config.feature_aggregation).contiguous())
        cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts)  # noqa: E731
        return cat(embeddings), {name: cat(parts) for name, parts in pyramids.items()}

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Features:
        """Features of a batch of (B, 3, H, W) frames: the framing's tiles go through the backbone; a frame's
        embedding is its tiles' mean, its layer maps are its tiles' maps stacked along the height (C, T*h, w)."""
        framing = self._framing(tuple(batch.shape[-2:]))
        if framing is None:  # one tile: the frame itself
            embedding, maps = self._tiles(batch)
        else:
            embedding, maps = self._tiles(framing.cut(batch))
            count = len(framing.tiles)
            embedding = embedding.reshape(batch.shape[0], count, -1).mean(dim=1)
            maps = {name: framing.stack(maps[name]) for name in self.layers}
        return Features(
            embedding=embedding.numpy().astype(np.float32, copy=False),
            pyramid={name: maps[name].numpy().astype(np.float32, copy=False) for name in self.layers},
        )

    def classify(self, batch: torch.Tensor) -> np.ndarray:
        """ImageNet logits (B, 1000); used to prove the weights are really ImageNet-trained."""
        with torch.inference_mode():
            return self.model(batch.to(self.device)).cpu().numpy()
