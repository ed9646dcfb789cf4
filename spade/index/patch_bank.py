"""PatchCore's image-level evidence: a frame's largest distance to a global memory bank of patch features.

A patch feature here is the concatenation of several pyramid layers at the first one's grid (PatchCore:
layer2 and layer3, the deeper layer upsampled bilinearly, each tile on its own so no tile borrows from
another). The bank is a greedy coreset of every gallery position's patch feature (`spade.index.coreset`);
``bank_max`` of a frame is the largest, over its positions, distance to the nearest bank vector.

Why beside SPADE's maps: the correspondence compares a test frame only with its K nearest normal frames,
chosen by a global embedding. On near-identical products whose look changes with pose (a tyre's tread as it
turns) that embedding picks neighbours poorly, and every position of every normal frame is the better
reference; one distance in the joint layer2+3 space also weighs texture and part together where averaging
per-layer maps lets one layer's noise (layer 1's specular highlights) dominate. Measured on the four shared
sets in README "Accuracy" (`benchmarks/image_decision.py`).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spade.index.coreset import FOLDER, SEED, MemoryBank, bank_files

PATCH = "patch"  # the stored bank's name beside the approximate mode's per-layer banks (coreset/patch.npy)
_BANKS: dict[tuple, MemoryBank] = {}
_LOCK = threading.Lock()
ROWS_PER_READ = 64
KEPT_BANKS = 32  # banks a process keeps (a few MB each), least recently used dropped: routed runs open many galleries


def patch_features(pyramid: dict[str, np.ndarray], layers: Sequence[str], tiles: int = 1) -> np.ndarray:
    """{layer: (B, C, T*h, w) maps} -> (B, P, sum C) patch features at ``layers[0]``'s grid (P = T*h*w).

    Deeper layers are upsampled bilinearly to the first layer's tile grid, tile by tile. Channels last throughout:
    the features are wanted so, and torch's CPU bilinear kernel is ~20x faster on channels-last input than on NCHW
    (this function 1.8-3.5x less CPU than upsampling in NCHW, the same numbers: benchmarks/patch_features.py).
    """
    first = pyramid[layers[0]]
    b, _, height, width = first.shape
    h = height // tiles
    parts = []
    for layer in layers:
        maps = torch.from_numpy(np.asarray(pyramid[layer], dtype=np.float32))
        c, lh, lw = maps.shape[1:]
        maps = maps.reshape(b, c, tiles, lh // tiles, lw).permute(0, 2, 3, 4, 1).reshape(b * tiles, lh // tiles, lw, c)
        if maps.shape[1:3] != (h, width):
            maps = F.interpolate(maps.permute(0, 3, 1, 2), size=(h, width), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        parts.append(maps)
    return np.ascontiguousarray(torch.cat(parts, -1).reshape(b, tiles * h * width, -1).numpy())


def _rows_as_maps(pyramid: dict[str, Any], layer: str, rows: np.ndarray, grid_of) -> np.ndarray:
    positions = np.asarray(pyramid[layer][rows], dtype=np.float32)  # (n, P, C)
    return np.ascontiguousarray(positions.transpose(0, 2, 1)).reshape(len(rows), -1, *grid_of(positions.shape[1]))


def build_patch_bank(pyramid: dict[str, Any], framing, settings: dict[str, Any],
                     progress: Callable[[int, int], None] | None = None) -> MemoryBank:
    """A greedy coreset of all the patch features of a gallery's ``pyramid`` ({layer: (N, P, C)} rows), keeping
    ``settings["ratio"]`` of them but at most ``settings["max_vectors"]`` (the greedy pass costs steps x candidates:
    bounded whatever the gallery's size), from a seeded random subset of at most ``max_candidates`` positions
    (read ``ROWS_PER_READ`` frames at a time); each vector knows its gallery row (leave-one-out scoring).
    ``settings``: `patch_bank_settings`; ``progress``: `greedy_coreset`'s."""
    layers, seed, max_candidates = settings["layers"], settings["seed"], settings["max_candidates"]
    n = int(pyramid[layers[0]].shape[0])
    tiles = len(framing.tiles)
    chunks, chunk_rows = [], []
    rng = np.random.default_rng(seed)
    total = None
    for start in range(0, n, ROWS_PER_READ):
        rows = np.arange(start, min(n, start + ROWS_PER_READ))
        features = patch_features({layer: _rows_as_maps(pyramid, layer, rows, framing.layer_grid) for layer in layers},
                                  layers, tiles)
        per_frame = features.shape[1]
        total = n * per_frame
        flat = features.reshape(-1, features.shape[2])
        if max_candidates and total > max_candidates:
            keep = rng.random(len(flat)) < max_candidates / total
            flat, owners = flat[keep], np.repeat(rows, per_frame)[keep]
        else:
            owners = np.repeat(rows, per_frame)
        chunks.append(np.ascontiguousarray(flat))
        chunk_rows.append(owners)
    candidates, owners = np.concatenate(chunks), np.concatenate(chunk_rows)
    del chunks, chunk_rows  # the candidates once in memory, not twice, while the coreset is chosen
    wanted = min(max(1, int(round(settings["ratio"] * total))), settings["max_vectors"])
    return MemoryBank.build(candidates, min(1.0, wanted / len(candidates)), settings["projection"], seed, rows=owners,
                            progress=progress)


def patch_bank_settings(config) -> dict[str, Any]:
    """What determines a gallery's patch bank (recorded in its manifest as ``patch_bank``)."""
    return {"layers": list(config.bank_layers), "ratio": float(config.bank_ratio), "max_vectors": int(config.bank_max_vectors),
            "projection": int(config.coreset_projection), "max_candidates": config.coreset_max_candidates, "seed": SEED}


def save_patch_bank(root: str, pyramid: dict[str, Any], framing, settings: dict[str, Any],
                    progress: Callable[[str], None] = lambda _: None) -> None:
    """Build the patch bank of a gallery's ``pyramid`` and store it under ``root`` (`bank_files` of ``PATCH``)."""
    bank = build_patch_bank(pyramid, framing, settings, lambda done, n: progress(
        f"gallery: patch memory bank ({'+'.join(settings['layers'])}): {done}/{n} vectors chosen"))
    os.makedirs(os.path.join(root, FOLDER), exist_ok=True)
    vectors_file, rows_file = bank_files(PATCH)
    np.save(os.path.join(root, vectors_file), bank.vectors)
    np.save(os.path.join(root, rows_file), bank.rows)
    progress(f"gallery: patch memory bank ({'+'.join(settings['layers'])}): {len(bank.vectors)} vectors kept "
             f"(ratio {settings['ratio']})")


def patch_bank_for(gallery, config, framing) -> MemoryBank:
    """The gallery's patch bank for ``config``'s ``bank_layers`` and ``bank_ratio``: the one `spade fit` stored when
    its settings match, else built on first use (seeded: every worker builds the same); kept for the process."""
    settings = patch_bank_settings(config)
    # a gallery hash names the same features wherever it is opened; an in-memory gallery has none
    identity = (getattr(gallery, "manifest", None) or {}).get("gallery_hash") or id(gallery.pyramid[config.bank_layers[0]])
    key = (identity, repr(sorted(settings.items())))
    with _LOCK:
        bank = _BANKS.pop(key, None)
        if bank is None:
            stored = getattr(gallery, "banks", None) or {}
            manifest = getattr(gallery, "manifest", None) or {}
            if PATCH in stored and manifest.get("patch_bank") == settings:
                bank = MemoryBank.from_vectors(*stored[PATCH])
            else:
                bank = build_patch_bank(gallery.pyramid, framing, settings)
        _BANKS[key] = bank  # most recently used last
        while len(_BANKS) > KEPT_BANKS:
            _BANKS.pop(next(iter(_BANKS)))
    return bank


def bank_maxima(pyramid: dict[str, np.ndarray], bank: MemoryBank, layers: Sequence[str], tiles: int,
                exclude_rows: np.ndarray | None = None, kernel: str = "auto") -> np.ndarray:
    """(B,) each frame's largest distance from a patch feature to its nearest bank vector; ``exclude_rows[i]``:
    the gallery row frame i may not match (leave-one-out); ``kernel``: the config's ``search_kernel``."""
    features = patch_features(pyramid, layers, tiles)
    b, p, c = features.shape
    own = None if exclude_rows is None else np.repeat(np.asarray(exclude_rows, dtype=np.int64), p)
    return bank.largest_distances(features.reshape(b * p, c), b, exclude_row=own, kernel=kernel).astype(np.float64)
