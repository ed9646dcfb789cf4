"""The gallery: normal images' embeddings (faiss index) and feature pyramids (row-addressable .npy files).

Layout of a gallery folder (local path or fsspec URL)::

    manifest.json        what built it: backbone, layers, preprocessing, weights, K, kappa,
                         image count, library versions, config hash, gallery hash, thresholds
    embeddings/*.parquet the fit pipeline's output, one row per image (kept for --append)
    images.parquet       gallery row -> image_id, uri, label, width, height
    index.faiss          exact L2 index of the global embeddings (row order as images.parquet)
    pyramid/<layer>/<shard>.npy  (images, positions, channels) blocks written by fit's workers, one per batch;
                         images.parquet's pyramid_shard (index into the manifest's "pyramid_shards") and
                         pyramid_row say where each gallery row is; scoring reads only the rows it needs
    coreset/<layer>.npy  the coreset memory bank (vectors, C) of each layer searched in one (every layer in
    coreset/<layer>-rows.npy  approximate mode, ``approximate_layers`` in exact mode) and the gallery row of each
                         vector; the manifest's "coreset" says how they were built, "coreset_layers" which
    coreset/patch.npy, patch-rows.npy  configs whose image score uses it only: the patch memory bank of the bank_max
                         term (`spade.index.patch_bank`); the manifest's "patch_bank" says how it was built

No process holds or copies the whole pyramid: workers write it, scoring reads the K neighbours' rows.

The manifest is written last, with the thresholds calibrated at fit and each file's size and sha256
(``files``; the pyramid shards' as the workers wrote them): a folder without one is an unfinished gallery.
Opening checks every listed file's size and each array's shape (cheap); `verify_gallery`
(``spade verify-gallery``) checks the hashes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spade.io import storage
from spade.config import FEATURE_DEFAULTS_BEFORE, FEATURES_LISTED_IF_SET, SpadeConfig, stable_hash
from spade.features.framing import framing_for
from spade.io.cache import cached_folder
from spade.index.coreset import bank_files, coreset_settings, load_banks, save_banks
from spade.index.patch_bank import PATCH, patch_bank_settings, save_patch_bank
from spade.index.knn import build_index
from spade.index.pyramid import ShardedLayer, shard_path

LOG = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: pyramid in shards written by fit's workers


class GalleryMismatch(ValueError):
    """The gallery was built with other features than the scoring config asks for."""


class GalleryMissing(FileNotFoundError):
    """No finished gallery at the given location."""


class GalleryDamaged(ValueError):
    """A gallery file is missing, truncated, replaced or of the wrong shape; the message names it and the fix."""


def _damaged(url: str, name: str, problem: str) -> GalleryDamaged:
    return GalleryDamaged(f"gallery {url}: {name} {problem}. The gallery is damaged: re-run `spade fit --gallery {url}` "
                          f"to rebuild it (or restore the file from a backup); `spade verify-gallery --gallery {url}` "
                          "checks every file's hash")


def library_versions() -> dict[str, str]:
    import apache_beam
    import torch
    import torchvision

    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "apache_beam": apache_beam.__version__,
    }


def _read_images_and_embeddings(shard_urls: list[str]) -> tuple[pa.Table, np.ndarray, dict, dict]:
    """(images table sorted by image_id, content duplicates once; embeddings; each layer's (positions, channels);
    each pyramid shard's {layer: {"bytes", "sha256"}} as the worker that wrote it recorded)."""
    columns = ["image_id", "uri", "label", "width", "height", "embedding", "pyramid_shard", "pyramid_row"]
    table = storage.read_parquet(shard_urls)
    missing = [c for c in columns + ["pyramid_digests"] if c not in table.column_names]
    if missing:
        raise GalleryMismatch(f"{shard_urls[0]}: embeddings table without {', '.join(missing)}: written by an older "
                              "version of spade; re-run `spade fit` without --append")
    layer_shapes = {name[:-len("_shape")]: table.column(name)[0].as_py() for name in table.column_names
                    if name.endswith("_shape") and table.num_rows}
    digests = {key: json.loads(text) for key, text in zip(table.column("pyramid_shard").to_pylist(),
                                                          table.column("pyramid_digests").to_pylist())}
    table = table.select(columns)
    if table.num_rows == 0:
        raise GalleryMissing("no usable normal images: every input was rejected (the rejected/ table says why)")
    order = np.argsort(np.asarray(table.column("image_id").to_pylist(), dtype=object), kind="stable")
    table = table.take(pa.array(order))
    ids = table.column("image_id").to_pylist()
    keep = [i for i, image_id in enumerate(ids) if i == 0 or image_id != ids[i - 1]]
    if len(keep) < len(ids):
        LOG.warning("gallery: %d duplicate images (same content) kept once", len(ids) - len(keep))
        table = table.take(pa.array(keep))
    embeddings = np.stack([np.asarray(e, dtype=np.float32) for e in table.column("embedding").to_pylist()])
    return table.drop(["embedding"]), embeddings, layer_shapes, digests


def _pyramid_columns(images: pa.Table) -> tuple[pa.Table, list[str]]:
    """images with ``pyramid_shard`` as an index into the sorted list of shard names (returned)."""
    names = images.column("pyramid_shard").to_pylist()
    shards = sorted(set(names))
    index = {name: i for i, name in enumerate(shards)}
    position = images.column_names.index("pyramid_shard")
    images = images.set_column(position, "pyramid_shard", pa.array([index[n] for n in names], pa.int32()))
    return images, shards


def build_gallery(shard_urls: list[str], gallery_url: str, config: SpadeConfig, weights_source: str, weights_sha256: str,
                  progress: Callable[[str], None] = LOG.info) -> dict[str, Any]:
    """Assemble a gallery from embedding Parquet shards (small rows: the pyramid shards are already in place,
    written by fit's workers); returns the manifest (written last)."""
    if not shard_urls:
        raise GalleryMissing(f"no embedding shards to build a gallery at {gallery_url}")
    images, embeddings, shapes, digests = _read_images_and_embeddings(shard_urls)
    images, pyramid_shards = _pyramid_columns(images)
    n = images.num_rows
    progress(f"gallery: {n} normal images, embedding dim {embeddings.shape[1]}, pyramid in {len(pyramid_shards)} shards "
             "written by the workers")
    workdir = storage.local_path(gallery_url) if storage.is_local(gallery_url) else tempfile.mkdtemp(prefix="spade-gallery-")
    coreset = None
    if config.coreset_layers:  # built once here instead of by every scoring worker
        coreset = coreset_settings(config)
        with _local_pyramids(gallery_url, images, pyramid_shards, config.coreset_layers) as pyramids:
            save_banks(workdir, config.coreset_layers, coreset, progress, pyramids)
    patch_bank = patch_bank_settings(config) if config.uses_patch_bank else None
    if patch_bank is not None:  # the image score's bank: built once here, stored for calibration and every worker
        with _local_pyramids(gallery_url, images, pyramid_shards, config.bank_layers) as pyramids:
            save_patch_bank(workdir, pyramids, framing_for(config), patch_bank, progress)
    pq.write_table(images, os.path.join(workdir, "images.parquet"))
    faiss.write_index(build_index(embeddings), os.path.join(workdir, "index.faiss"))
    ids = images.column("image_id").to_pylist()
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": config.backbone,
        "layers": list(config.layers),
        "preprocessing": {"resize": config.resize, "crop": config.crop, "framing": config.framing,
                          "feature_aggregation": config.feature_aggregation, "mean": list(config.mean), "std": list(config.std),
                          "frame": _frame_record(config)},
        "weights": {"spec": config.weights, "source": weights_source, "sha256": weights_sha256},
        "feature_signature": config.feature_signature() | {"weights_sha256": weights_sha256},
        "k": config.k, "kappa": config.kappa, "sigma": config.sigma, "approximate_local_radius": config.local_radius,
        "approximate_local_block": config.local_block, "map_edge_band": config.map_edge_band,
        "feature_dtype": config.feature_dtype,
        "num_images": n,
        "embedding_dim": int(embeddings.shape[1]),
        "layer_shapes": shapes,
        "pyramid_shards": pyramid_shards,
        "library_versions": library_versions(),
        "config": config.to_dict(),
        "config_hash": stable_hash(config.to_dict()),
        "gallery_hash": stable_hash({"features": config.feature_signature(), "weights": weights_sha256,
                                     "dtype": config.feature_dtype, "images": ids}),
        "thresholds": {},
    }
    if coreset is not None:
        manifest["coreset"] = coreset
        manifest["coreset_layers"] = list(config.coreset_layers)
    if patch_bank is not None:
        manifest["patch_bank"] = patch_bank
    manifest["files"] = {name: storage.file_digest(os.path.join(workdir, name)) for name in _built_files(manifest)}
    manifest["files"] |= {shard_path(layer, key): digests[key][layer] for layer in config.layers for key in pyramid_shards}
    if not storage.is_local(gallery_url):
        fs, path = storage.filesystem(gallery_url)
        for name in _built_files(manifest):
            fs.put_file(os.path.join(workdir, name), f"{path}/{name}")
        shutil.rmtree(workdir, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _local_pyramids(gallery_url: str, images: pa.Table, pyramid_shards: list[str], layers) -> Iterator[dict[str, ShardedLayer]]:
    """{layer: (N, P, C) rows} of the workers' pyramid shards, local copies while the context lasts."""
    with contextlib.ExitStack() as copies:
        yield {layer: ShardedLayer([copies.enter_context(storage.local_copy(storage.join(gallery_url, shard_path(layer, key))))
                                    for key in pyramid_shards],
                                   images.column("pyramid_shard").to_numpy(), images.column("pyramid_row").to_numpy())
               for layer in layers}


def _frame_record(config: SpadeConfig) -> dict[str, Any]:
    """What the model sees of every image of this gallery: the frame (height, width) and its tiles."""
    framing = framing_for(config)
    return {"size": list(framing.size), "tiles": len(framing.tiles), "tile_size": list(framing.tile_size)}


def coreset_layers(manifest: dict[str, Any]) -> list[str]:
    """The layers whose coreset banks the gallery stores (every layer in galleries fitted before
    ``approximate_layers`` existed)."""
    return manifest.get("coreset_layers", manifest["layers"]) if manifest.get("coreset") else []


def _built_files(manifest: dict[str, Any]) -> list[str]:
    """The files `build_gallery` writes (the pyramid shards are the workers'), relative to the gallery root."""
    names = ["images.parquet", "index.faiss"]
    names += [name for layer in coreset_layers(manifest) for name in bank_files(layer)]
    if manifest.get("patch_bank"):
        names += list(bank_files(PATCH))
    return names


def pyramid_files(manifest: dict[str, Any]) -> list[str]:
    """The gallery's pyramid shard files, relative to its root."""
    return [shard_path(layer, key) for layer in manifest["layers"] for key in manifest["pyramid_shards"]]


def _gallery_files(manifest: dict[str, Any]) -> list[str]:
    """The files of a gallery besides its manifest and embeddings, relative to its root."""
    return _built_files(manifest) + pyramid_files(manifest)


def remove_unlisted_pyramid_shards(gallery_url: str, manifest: dict[str, Any]) -> None:
    """Delete pyramid files this gallery does not list: shards of earlier fits (other images or features), a killed
    fit's, and the single-file pyramids of format 1. A fit --append keeps what it lists, old shards included."""
    keep = {"/".join(name.split("/")[-2:]) for name in pyramid_files(manifest)}  # <layer>/<shard>.npy
    root = storage.join(gallery_url, "pyramid")
    for url in storage.list_files(root):
        storage.remove(url)
    for folder in storage.list_dirs(root):
        for url in storage.list_files(folder):
            if "/".join(url.rstrip("/").split("/")[-2:]) not in keep:
                storage.remove(url)


def write_manifest(gallery_url: str, manifest: dict[str, Any]) -> None:
    """Publish a gallery: the manifest goes last, once every file it lists is complete (atomic write)."""
    storage.write_json(storage.join(gallery_url, MANIFEST), manifest)


def read_manifest(url: str) -> dict[str, Any]:
    """A finished gallery's manifest, without opening the rest (what a launcher needs: hash, thresholds, features)."""
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        raise GalleryMissing(f"{url} has no {MANIFEST}: not a finished gallery. Run `spade fit --gallery {url}` first "
                             "(an interrupted fit leaves no manifest; re-run it).")
    manifest = storage.read_json(manifest_url)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GalleryMismatch(f"{url}: gallery format {manifest.get('format_version')} is not {FORMAT_VERSION}; rebuild it with `spade fit`")
    return manifest


def with_gallery_settings(config: SpadeConfig, manifest: dict[str, Any]) -> SpadeConfig:
    """``config`` with what fit fixed from the gallery's images where it leaves them open: the frame size of an
    ``aspect`` or ``tiles`` framing without one (scoring frames every image into it) and ``brightness: auto``
    (the gallery's ``keep`` or ``imagenet_mean``: every image is prepared as its frames were)."""
    signature = manifest.get("feature_signature") or {}
    if config.frame_size is None and config.frame_from_gallery:
        size = signature.get("frame_size")
        if size is not None:
            config = config.replace(frame_size=tuple(size))
    if config.brightness == "auto":
        config = config.replace(brightness=signature.get("brightness", FEATURES_LISTED_IF_SET["brightness"]))
    return config


def check_compatible(manifest: dict[str, Any], url: str, config: SpadeConfig, weights_sha256: str | None = None) -> None:
    """Raise `GalleryMismatch` naming every feature setting where ``config`` (and the weights
    actually loaded, when given) and the gallery differ; what a config leaves to the gallery (`with_gallery_settings`)
    it takes from the gallery."""
    config = with_gallery_settings(config, manifest)
    built = FEATURE_DEFAULTS_BEFORE | dict(manifest["feature_signature"])
    built_sha = built.pop("weights_sha256", None)
    if weights_sha256 is not None and built_sha != weights_sha256:
        raise GalleryMismatch(f"gallery {url} was built with backbone weights sha256 {built_sha[:12]}..., "
                              f"but this run loaded {weights_sha256[:12]}... ({config.weights!r}). Point `weights:` at "
                              f"the file the gallery used ({manifest['weights']['source']}) or re-run `spade fit`.")
    wanted = FEATURES_LISTED_IF_SET | config.feature_signature()
    if built.get("weights") != wanted["weights"] and "auto" in (built.get("weights"), wanted["weights"]):
        built.pop("weights")
        wanted = {k: v for k, v in wanted.items() if k != "weights"}
    diffs = [f"{key}: gallery has {built.get(key)!r}, config has {wanted[key]!r}" for key in wanted if built.get(key) != wanted[key]]
    if diffs:
        raise GalleryMismatch(f"gallery {url} was built with other features than this config ("
                              + "; ".join(diffs) + "). Score with the config the gallery was fitted with "
                              "(its manifest.json lists it), or re-run `spade fit` with this config.")


def check_files(url: str, manifest: dict[str, Any], root: str | None = None) -> None:
    """Every file the manifest lists is there with the recorded size: a truncated or replaced file is caught
    before anything is memory-mapped. Sizes are read from ``root``, a local copy (a worker's cache), or else
    asked of the gallery's storage (the launcher: one size query per file)."""
    files = manifest.get("files")
    if files is None:
        LOG.warning("gallery %s records no file sizes/hashes (built before they were recorded); damaged files go "
                    "unnoticed until used. Re-run `spade fit` to rebuild it with them.", url)
        return
    for name, record in files.items():
        if root is not None:
            path = os.path.join(root, name)
            size = os.path.getsize(path) if os.path.exists(path) else None
        else:
            file_url = storage.join(url, name)
            size = storage.file_size(file_url) if storage.exists(file_url) else None
        if size is None:
            raise _damaged(url, name, "is missing")
        if size != record["bytes"]:
            raise _damaged(url, name, f"has {size} bytes, the manifest records {record['bytes']} (truncated or replaced)")


def verify_gallery(url: str) -> list[str]:
    """Check every file the manifest lists against its recorded size and sha256; returns the problems (none:
    the gallery is intact). Reads every byte once (`Gallery.open` checks only sizes)."""
    manifest = read_manifest(url)
    files = manifest.get("files")
    if files is None:
        return [f"{MANIFEST} records no file hashes (built before they were recorded): re-run `spade fit --gallery {url}`"]
    problems = []
    for name, record in sorted(files.items()):
        file_url = storage.join(url, name)
        if not storage.exists(file_url):
            problems.append(f"{name}: missing")
            continue
        found = storage.file_digest(file_url)
        if found != {"bytes": record["bytes"], "sha256": record["sha256"]}:
            problems.append(f"{name}: {found['bytes']} bytes, sha256 {found['sha256'][:16]}...; the manifest records "
                            f"{record['bytes']} bytes, sha256 {record['sha256'][:16]}...")
    if not manifest.get("thresholds"):
        problems.append(f"{MANIFEST} has no calibrated thresholds (fewer than 2 images, or built by an older version): "
                        "scores will decide nothing unless the config or --thresholds gives them")
    return problems


@dataclass
class Gallery:
    """A finished gallery opened for scoring: index in memory, pyramids memory-mapped."""

    url: str
    manifest: dict[str, Any]
    images: pa.Table
    index: faiss.Index
    pyramid: dict[str, np.ndarray]
    banks: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # stored coreset banks: {layer: (vectors, rows)}

    @property
    def hash(self) -> str:
        return self.manifest["gallery_hash"]

    @property
    def image_ids(self) -> list[str]:
        return self.images.column("image_id").to_pylist()

    @classmethod
    def open(cls, url: str, cache_dir: str | None = None, manifest: dict[str, Any] | None = None) -> "Gallery":
        """Open a gallery; a remote one is copied once per machine into a local cache (keyed by its hash and its
        files'; see `spade.io.cache`) for memory-mapping.

        Every file is checked against the manifest's sizes and every array against its shape: a damaged
        gallery stops here with `GalleryDamaged` naming the file. ``manifest`` opens a gallery whose manifest
        is not written yet (`spade fit` calibrates before publishing it).
        """
        manifest = read_manifest(url) if manifest is None else manifest
        if storage.is_local(url):
            root = storage.local_path(url)
        else:
            key = f"v{FORMAT_VERSION}-{manifest['gallery_hash']}"  # same images, another layout: another entry
            if manifest.get("files"):  # the same images fitted again (other URIs, other bytes): another entry
                key += "-files-" + stable_hash(manifest["files"])[:12]
            if manifest.get("coreset"):  # same features, other banks: another cache entry
                key += "-coreset-" + stable_hash(manifest["coreset"])[:12]
            if manifest.get("patch_bank"):
                key += "-patch-" + stable_hash(manifest["patch_bank"])[:12]
            fs, path = storage.filesystem(url)
            root = cached_folder(key, _gallery_files(manifest), lambda name, target: fs.get_file(f"{path}/{name}", target),
                                 cache_dir)
        check_files(url, manifest, root)
        n = manifest["num_images"]
        try:
            images = pq.read_table(os.path.join(root, "images.parquet"))
            index = faiss.read_index(os.path.join(root, "index.faiss"))
        except Exception as exc:  # Arrow and faiss raise their own types for damaged files
            raise _damaged(url, "images.parquet or index.faiss", f"cannot be read ({exc})") from None
        if images.num_rows != n or index.ntotal != n:
            raise _damaged(url, "images.parquet/index.faiss", f"hold {images.num_rows}/{index.ntotal} images, the "
                                                              f"manifest {n}")
        shards, rows = images.column("pyramid_shard").to_numpy(), images.column("pyramid_row").to_numpy()
        pyramid = {}
        for layer in manifest["layers"]:
            try:
                pyramid[layer] = ShardedLayer([os.path.join(root, shard_path(layer, key)) for key in manifest["pyramid_shards"]],
                                              shards, rows)
            except (OSError, ValueError) as exc:
                raise _damaged(url, f"pyramid/{layer}/", f"cannot be read ({exc})") from None
            expected = tuple(manifest.get("layer_shapes", {}).get(layer, pyramid[layer].shape[1:]))
            if tuple(pyramid[layer].shape[1:]) != expected:
                raise _damaged(url, f"pyramid/{layer}/", f"has rows of shape {pyramid[layer].shape[1:]}, the manifest "
                                                         f"records {expected}")
        banks = load_banks(root, coreset_layers(manifest)) or None
        if manifest.get("patch_bank"):
            banks = (banks or {}) | {PATCH: tuple(np.load(os.path.join(root, name), mmap_mode="r") for name in bank_files(PATCH))}
        return cls(url=url, manifest=manifest, images=images, index=index, pyramid=pyramid, banks=banks)

    def resident_bytes(self) -> int:
        """What this open gallery holds in memory: its index, image table and stored banks (pyramid rows are read
        from their files by position, not held)."""
        banks = sum(vectors.nbytes + rows.nbytes for vectors, rows in (self.banks or {}).values())
        return int(self.index.ntotal * self.index.d * 4 + self.images.nbytes + banks)

    def check_compatible(self, config: SpadeConfig, weights_sha256: str | None = None) -> None:
        """See `check_compatible`."""
        check_compatible(self.manifest, self.url, config, weights_sha256)

    def neighbour_features(self, layer: str, rows: np.ndarray) -> np.ndarray:
        """All positions' features of the given gallery rows, stacked: (len(rows) * positions, channels)."""
        block = self.pyramid[layer][np.sort(np.asarray(rows))]
        return block.reshape(-1, block.shape[-1])
