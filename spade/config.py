"""Run configuration: one dataclass, loaded from YAML, hashed into the gallery manifest."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import yaml

LAYERS_BY_BACKBONE_FAMILY = ("layer1", "layer2", "layer3", "layer4")
FRAMINGS = ("crop", "full", "aspect", "tiles")
TILE_NEIGHBOURS = ("same", "all")
FEATURE_RUNTIMES = ("channels_last", "eager", "openvino")
FEATURE_PRECISIONS = ("f32", "bf16")
BRIGHTNESS = ("keep", "imagenet_mean")  # spade.io.images.preprocess
BRIGHTNESS_SETTINGS = ("auto",) + BRIGHTNESS  # auto: one of those, fixed at fit from the gallery's frames
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the mean RGB intensity of ImageNet's photos, in [0, 1]
DEVICES = ("auto", "cpu", "cuda")
SEARCH_KERNELS = ("auto", "float32", "gemm")  # spade.index.fused_nearest
# Settings that change only speed or file layout, never a row: runs that differ only in them may resume each other's
# ledgers.
SPEED_ONLY = ("num_threads", "shards", "rows_per_shard", "batch_size", "feature_runtime", "device", "search_kernel")
IMAGE_SCORES = ("knn", "map_max", "map_top", "combined", "combined_top", "bank_max", "combined_bank", "combined_residual",
                "combined_selected", "region_excess", "combined_region", "residual_or_region")
BANK_SCORES = ("bank_max", "combined_bank", "combined_residual", "combined_selected", "combined_region",
               "residual_or_region")  # the image scores that need a gallery's patch bank
# Feature settings a signature lists only where they differ from these values, so that galleries fitted before them
# keep their hash; a manifest without one was built with this value.
FEATURES_LISTED_IF_SET = {"feature_precision": "f32", "brightness": "keep"}
# Feature settings added after galleries were first written: a manifest without one was built with this value.
FEATURE_DEFAULTS_BEFORE = {"framing": "crop", "feature_aggregation": 1, "frame_size": None} | FEATURES_LISTED_IF_SET
# Feature settings that only some framings have (`SpadeConfig.feature_signature` lists them only for those).
FRAMING_FEATURES = {"aspect": ("frame_size",), "tiles": ("frame_size", "tile_size", "tile_overlap")}


@dataclass(frozen=True)
class SpadeConfig:
    """Everything that decides what a gallery is and how images are scored. The defaults are the recommended
    setting (configs/default.yaml says why); configs/paper.yaml is the paper's.

    The fields that change the features (``backbone``, ``weights``, ``layers``, ``resize``, ``crop``, ``framing``,
    ``feature_aggregation``, ``mean``, ``std``, ``feature_precision``, ``brightness``) must match between `fit` and
    `score`; `feature_signature` hashes exactly those.

    ``framing``: what the model sees (`spade.features.framing`). ``crop`` (the paper): the short side resized
    to ``resize``, then the centre ``crop``² (the borders of the frame are never inspected); ``full``: the whole
    frame resized to ``crop``² (aspect ratio not kept, nothing cut off); ``aspect``: the whole frame at the
    paper's pixel scale, short side ``resize``, long side in proportion (``frame_size`` [height, width], fixed
    at fit from the gallery's images and recorded; null: decide at fit); ``tiles``: that frame cut into
    overlapping ``tile_size``² tiles (at least ``tile_overlap`` pixels shared), each scored against the tiles of the
    K nearest normal frames at the same place (``tile_neighbours: same``, cost linear in the frame's length) or
    at every place (``all``), the tile maps blended into one frame map.
    ``feature_aggregation``: side of the local average (stride 1) applied to each pyramid layer's
    map at extraction, PatchCore's neighbourhood aggregation (3); 1 = none (the paper).
    ``brightness``: ``keep`` (the frame as the camera gave it) or ``imagenet_mean`` (each frame's mean intensity over
    its channels moved to that of ImageNet's photos, which the weights learnt from, its colour balance and contrast
    kept; for products far brighter than those: the commutators' PRO 0.764 -> 0.817, but darker frames brightened
    lose the tire's image decision and darkened ones lose bottle's and metal_plate's pixel scores; README "Accuracy");
    ``auto`` (default): ``imagenet_mean`` for a gallery whose frames are far brighter than photos (median above
    `spade.io.images.BRIGHT_GALLERY`), else ``keep``, fixed at fit from a sample of its images and recorded.
    ``map_edge_band``: within this many frame pixels of a tile's edge (the frame's border, the seams between tiles),
    the score map is lowered by how far the calibration images' mean map rises there above its median further inside
    (`spade.scoring.position_baseline.edge_excess`): features near a tile's edge saw the network's zero padding and
    run high in every frame. 48 = three strides of the deepest layer; 0: the correspondence's distances as they are
    (the paper). Image terms are taken from the map before it, as calibration measured them.
    ``image_score`` (`spade.scoring.image_score`): ``knn`` (the paper: mean distance of the global embedding to
    its K nearest normal embeddings), ``map_max`` (the maximum of the smoothed pixel score map, as PatchCore and
    PaDiM decide), ``map_top`` (the mean of the map's highest 1 %: a defect's extent, not one hot pixel),
    ``combined`` / ``combined_top`` (the kNN term and ``map_max`` / ``map_top``, each standardised by its
    leave-one-out mean and standard deviation on the gallery's normal calibration images, then summed),
    ``bank_max`` (PatchCore's: a frame's largest distance to a global coreset memory bank of its ``bank_layers``
    concatenated, ``bank_ratio`` of all gallery positions kept, at most ``bank_max_vectors``; `spade.index.patch_bank`), ``combined_bank``
    (``map_top`` and ``bank_max`` standardised and summed), ``combined_residual`` (``map_residual``, how far the
    map's highest 0.1 % rise above the calibration images' mean map at the same place, with ``bank_max`` and ``knn``,
    standardised and summed; `spade.scoring.position_baseline`), ``combined_selected`` (the two of those three
    terms that best separate ``synthetic_defects`` gallery images with a defect drawn on them from the normal
    calibration images, measured at `fit`; `spade.scoring.term_selection`), ``region_excess`` (how much of the frame
    rises above the level normal frames' residuals reach, over its largest connected region: a crack's extent;
    `spade.scoring.region_excess`), ``combined_region`` (``combined_residual``'s terms and ``region_excess``),
    ``residual_or_region`` (the default: the larger of ``combined_residual`` and ``region_excess``, each
    standardised by its scores on the normal calibration images).
    Calibration at `fit`: ``calibration_images`` gallery images (evenly spaced; all when the gallery
    is smaller) are scored leave-one-out; the image threshold is their mean plus (z + ``calibration_margin``)
    standard deviations, z the standard normal quantile of 1 - ``calibration_image_fpr`` (0: their highest
    score plus the margin, the paper-era rule); the pixel threshold the (1 - ``calibration_fpr``) quantile of
    their pixel scores (`spade.scoring.calibration`).
    """

    backbone: str = "tf_efficientnet_lite2"
    weights: str = "auto"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    resize: int = 256
    crop: int = 256
    framing: str = "tiles"
    frame_size: tuple[int, int] | None = None
    tile_size: int = 256
    tile_overlap: int = 64
    tile_neighbours: str = "same"
    feature_aggregation: int = 3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    k: int = 10
    image_score: str = "residual_or_region"
    kappa: int = 1
    sigma: float = 2.0  # Gaussian smoothing of the score map, in frame pixels (the paper: 4, unaggregated features)
    map_edge_band: int = 48  # frame pixels near a tile's edge where the normal maps' excess is removed (0: none)
    feature_dtype: str = "float32"
    feature_runtime: str = "openvino"  # openvino (OpenVINO's CPU runtime) / channels_last / eager (torch NHWC / NCHW)
    feature_precision: str = "bf16"  # the backbone's arithmetic: bf16 where the hardware has it (else f32), or f32
    brightness: str = "auto"  # auto / keep / imagenet_mean: frames moved to ImageNet's mean intensity (README)
    batch_size: int = 8
    device: str = "auto"  # where the backbone and the exact correspondence run: auto (a CUDA device if any), cpu, cuda
    num_threads: int = 0
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    calibration_images: int = 100
    calibration_fpr: float = 0.001
    calibration_image_fpr: float = 0.05
    calibration_margin: float = 0.0
    synthetic_defects: int = 120  # gallery images scored with a drawn defect at fit, for combined_selected's terms
    eval_region: str = "full"
    shards: int = 0  # table files per output table; 0: follow the row count (rows_per_shard rows per file)
    rows_per_shard: int = 10_000
    open_galleries: int = 8  # galleries a score worker keeps open in a routed run (least recently used dropped)
    open_galleries_mb: int = 2048  # ... and the most their in-memory parts (index, image table, banks) may add up to
    scoring_mode: str = "exact"
    approximate_layers: tuple[str, ...] = ("layer1",)  # of layers, those whose pixel scores come from the coreset bank in exact mode too
    approximate_local_radius: int = 2  # bank-searched layers' pixel maps also search the K nearest frames near each place (spade.scoring.local_search); 0: the bank alone
    approximate_local_block: int = 4  # ... block by block: each block of this many positions a side sees the neighbours' block grown by the radius
    refine_distances: bool = True
    search_kernel: str = "auto"  # CPU nearest-vector searches: auto (the fused kernel where built, AVX2+FMA; bank and
    # correspondence searches screened in bfloat16 where the CPU has AVX512-BF16, the same winners), float32 (the
    # fused kernel, no screen), gemm
    coreset_ratio: float = 0.01
    coreset_projection: int = 128
    coreset_max_candidates: int = 200_000
    coreset_max_vectors: int | None = 8192  # caps each coreset bank (its search then costs the same on any gallery)
    bank_layers: tuple[str, ...] = ("layer2", "layer3")
    bank_ratio: float = 0.01
    bank_max_vectors: int = 8192  # bounds the bank's greedy pass at fit (and its search) on large galleries
    max_source_pixels: int | None = 40_000_000
    max_aspect_ratio: float | None = 50.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "bank_layers", tuple(self.bank_layers))
        object.__setattr__(self, "approximate_layers", tuple(self.approximate_layers or ()))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.frame_size is not None:
            object.__setattr__(self, "frame_size", tuple(int(v) for v in self.frame_size))
        problems = []
        if not self.layers:
            problems.append("layers must name at least one of " + ", ".join(LAYERS_BY_BACKBONE_FAMILY))
        for name in self.layers:
            if name not in LAYERS_BY_BACKBONE_FAMILY:
                problems.append(f"unknown layer {name!r}; use {', '.join(LAYERS_BY_BACKBONE_FAMILY)}")
        if self.crop > self.resize:
            problems.append(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.framing not in FRAMINGS:
            problems.append(f"framing must be one of {', '.join(FRAMINGS)} (crop: the paper's centre crop; full: the whole frame)")
        if self.frame_size is not None and (len(self.frame_size) != 2 or min(self.frame_size) < 32):
            problems.append("frame_size must be [height, width], each >= 32 (or null: decided at fit from the images)")
        if self.tile_size < 32 or self.tile_size % 32:
            problems.append("tile_size must be a multiple of 32 (the backbone's largest stride), e.g. 256")
        if not 0 <= self.tile_overlap < self.tile_size // 2 + 1:
            problems.append("tile_overlap must be in [0, tile_size / 2] pixels")
        if self.tile_neighbours not in TILE_NEIGHBOURS:
            problems.append("tile_neighbours must be 'same' (tiles at the same place) or 'all' (every tile)")
        if self.feature_aggregation < 1 or self.feature_aggregation % 2 == 0:
            problems.append("feature_aggregation must be an odd size >= 1 (1: none; 3: PatchCore's 3x3 average)")
        if self.image_score not in IMAGE_SCORES:
            problems.append(f"image_score must be one of {', '.join(IMAGE_SCORES)}")
        if not 0.0 <= self.calibration_image_fpr < 1.0:
            problems.append("calibration_image_fpr must be in [0, 1)")
        if self.calibration_margin < 0:
            problems.append("calibration_margin must be >= 0")
        if self.synthetic_defects < 0:
            problems.append("synthetic_defects must be >= 0 (0: combined_selected keeps all three terms)")
        if self.k < 1:
            problems.append("k must be >= 1")
        if self.kappa < 1:
            problems.append("kappa must be >= 1")
        if self.feature_runtime not in FEATURE_RUNTIMES:
            problems.append(f"feature_runtime must be one of {', '.join(FEATURE_RUNTIMES)}")
        if self.feature_precision not in FEATURE_PRECISIONS:
            problems.append(f"feature_precision must be one of {', '.join(FEATURE_PRECISIONS)}")
        if self.brightness not in BRIGHTNESS_SETTINGS:
            problems.append(f"brightness must be one of {', '.join(BRIGHTNESS_SETTINGS)}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}")
        if self.search_kernel not in SEARCH_KERNELS:
            problems.append(f"search_kernel must be one of {', '.join(SEARCH_KERNELS)} (auto: the fused kernel where "
                            "it was built and the CPU has AVX2 and FMA, screened in bfloat16 where it has AVX512-BF16; "
                            "float32: the fused kernel without the screen; gemm: torch's GEMM and row minima)")
        if self.feature_dtype not in ("float16", "float32"):
            problems.append("feature_dtype must be float16 or float32")
        if self.eval_region not in ("crop", "full"):
            problems.append("eval_region must be 'crop' or 'full'")
        if self.scoring_mode not in ("exact", "approximate"):
            problems.append("scoring_mode must be 'exact' (the paper) or 'approximate' (coreset memory bank)")
        for name in self.approximate_layers:
            if name not in LAYERS_BY_BACKBONE_FAMILY:
                problems.append(f"approximate_layers: unknown layer {name!r}; use {', '.join(LAYERS_BY_BACKBONE_FAMILY)}")
        if self.map_edge_band < 0:
            problems.append("map_edge_band must be >= 0 frame pixels (0: the score maps as the correspondence gives them)")
        if self.approximate_local_radius < 0:
            problems.append("approximate_local_radius must be >= 0 (0: the coreset bank alone)")
        elif self.approximate_local_radius and self.kappa != 1 and self.coreset_layers:
            problems.append("approximate_local_radius needs kappa: 1 (the bank and the local window each give their "
                            "nearest feature); set approximate_local_radius: 0 for kappa > 1")
        if self.approximate_local_block < 1:
            problems.append("approximate_local_block must be >= 1 position (the local search's blocks, a side)")
        if not 0 < self.coreset_ratio <= 1:
            problems.append("coreset_ratio must be in (0, 1]")
        if self.coreset_max_vectors is not None and self.coreset_max_vectors < 1:
            problems.append("coreset_max_vectors must be >= 1 (or null: ratio alone)")
        if not 0 < self.bank_ratio <= 1 or self.bank_max_vectors < 1:
            problems.append("bank_ratio must be in (0, 1] and bank_max_vectors >= 1")
        if self.image_score in BANK_SCORES and (
                not self.bank_layers or any(layer not in self.layers for layer in self.bank_layers)):
            problems.append(f"bank_layers ({', '.join(self.bank_layers) or 'none'}) must be among layers "
                            f"({', '.join(self.layers)}) for image_score: {self.image_score}")
        if self.max_source_pixels is not None and self.max_source_pixels < 1:
            problems.append("max_source_pixels must be >= 1 (or null for no limit)")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            problems.append("max_aspect_ratio must be >= 1 (or null for no limit)")
        if self.batch_size < 1 or self.rows_per_shard < 1:
            problems.append("batch_size and rows_per_shard must be >= 1")
        if self.open_galleries < 1 or self.open_galleries_mb < 1:
            problems.append("open_galleries and open_galleries_mb must be >= 1")
        if self.shards < 0:
            problems.append("shards must be >= 0 (0: as many as the row count needs)")
        if problems:
            raise ValueError("invalid SPADE config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("layers", "bank_layers", "mean", "std", "frame_size"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def replace(self, **changes: Any) -> "SpadeConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_patch_bank(self) -> bool:
        """Whether the image score needs a patch bank (`spade.index.patch_bank`): fit builds, stores and calibrates
        it only then (a wide backbone's concatenated layers make it costly for configs that never use it)."""
        return self.image_score in BANK_SCORES

    @property
    def coreset_layers(self) -> tuple[str, ...]:
        """The layers whose pixel scores come from the global coreset memory bank (`spade.index.coreset`): every
        layer in approximate mode; in exact mode those of ``approximate_layers`` (a layer whose exact
        correspondence costs most and whose bank loses nothing measurable), the others searched exactly."""
        if self.scoring_mode == "approximate":
            return self.layers
        return tuple(layer for layer in self.layers if layer in self.approximate_layers)

    @property
    def local_radius(self) -> int:
        """The local window's radius the score maps are made with (`spade.scoring.local_search`): 0 where no layer is
        searched in a coreset bank, whatever ``approximate_local_radius`` says (the exact configs' maps)."""
        return self.approximate_local_radius if self.coreset_layers else 0

    @property
    def local_block(self) -> int:
        """The local search's block side the score maps are made with: 0 where they are made without the search."""
        return self.approximate_local_block if self.local_radius else 0

    @property
    def frame_from_gallery(self) -> bool:
        """Whether this framing frames every image into a size the gallery fixes at fit (``frame_size``)."""
        return "frame_size" in FRAMING_FEATURES.get(self.framing, ())

    def feature_signature(self) -> dict[str, Any]:
        """The settings that determine feature values; fit and score must agree on them."""
        d = self.to_dict()
        keys = ("backbone", "weights", "layers", "resize", "crop", "framing", "feature_aggregation", "mean", "std")
        listed = {key: d[key] for key, usual in FEATURES_LISTED_IF_SET.items() if d[key] != usual}
        return {key: d[key] for key in keys + FRAMING_FEATURES.get(self.framing, ())} | listed


def config_from_mapping(values: Mapping[str, Any], source: str = "<mapping>") -> SpadeConfig:
    known = {f.name for f in dataclasses.fields(SpadeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}; known keys are {sorted(known)}")
    return SpadeConfig(**dict(values))


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> SpadeConfig:
    """Load a YAML config (local path or fsspec URL); ``None`` gives the defaults."""
    values: dict[str, Any] = {}
    if path:
        with fsspec.open(path, "r") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of key: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_mapping(values, source=path or "<defaults>")


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short content hash of JSON-serialisable data, stable across runs and machines."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
