"""Gallery pyramids stored as shards that fit's workers write: no process ever holds or copies the whole pyramid.

Each fit batch writes one ``.npy`` per layer, ``pyramid/<layer>/<shard>.npy`` of shape (rows, positions,
channels), named by a hash of the batch's image ids (the same batch gives the same name). The manifest lists
the shards (``pyramid_shards``) and ``images.parquet`` says where each gallery row lives (``pyramid_shard``: an
index into that list, ``pyramid_row``: the row inside the shard). `ShardedLayer` presents one layer as the
(N, positions, channels) array the scoring code reads, fetching only the rows asked for from whichever shards
hold them (``pread`` from the files; nothing stays mapped, so memory stays flat as the gallery grows).
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Sequence

import numpy as np


def shard_key(image_ids: Sequence[str]) -> str:
    """The name of the shard holding these images (same ids in the same order: same name)."""
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:24]


def shard_path(layer: str, key: str) -> str:
    """A shard's path relative to the gallery (or staging) root."""
    return f"pyramid/{layer}/{key}.npy"


def pread_exactly(fd: int, target: np.ndarray, offset: int, what: str) -> None:
    """Fill the contiguous array ``target`` with the file's bytes from ``offset`` on, however many reads the OS
    needs; a file that ends first raises `OSError` naming ``what``."""
    view = memoryview(target.reshape(-1)).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read from {what}")
        done += got


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class ShardedLayer:
    """One pyramid layer as an (N, positions, channels) array over shard files (read-only).

    ``paths[s]`` is shard ``s``'s local ``.npy``; gallery row ``r`` is row ``rows[r]`` of shard ``shards[r]``.
    Indexing with an int, a slice or an int array returns an ndarray of those rows; `read_rows` fills a
    caller's buffer (what `spade.scoring.correspondence.PyramidReader` uses).
    """

    ndim = 3

    def __init__(self, paths: Sequence[str], shards: np.ndarray, rows: np.ndarray):
        self.paths = list(paths)
        self.shards = np.asarray(shards, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._arrays = [np.load(path, mmap_mode="r") for path in self.paths]
        for path, array in zip(self.paths, self._arrays):
            if array.ndim != 3 or array.shape[1:] != self._arrays[0].shape[1:] or array.dtype != self._arrays[0].dtype:
                raise ValueError(f"{path}: pyramid shard of shape {array.shape} {array.dtype}, others "
                                 f"{self._arrays[0].shape[1:]} {self._arrays[0].dtype}; rebuild the gallery with `spade fit`")
        counts = np.array([len(a) for a in self._arrays])
        if len(self.rows) and (self.shards.max() >= len(self._arrays) or np.any(self.rows >= counts[self.shards])):
            raise ValueError(f"gallery rows point past the end of their pyramid shards ({self.paths[0]} ...); "
                             "rebuild the gallery with `spade fit`")
        self.dtype = self._arrays[0].dtype
        self.shape = (len(self.rows), *self._arrays[0].shape[1:])
        self._offsets = [int(a.offset) for a in self._arrays]
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return np.asarray(self._arrays[self.shards[index]][self.rows[index]])
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        return self._read(rows, out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def _read(self, rows: np.ndarray, out: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
        """Rows into ``out`` (same dtype), from position ``first[i]`` of row ``rows[i]`` on (None: whole rows) for
        ``out.shape[1]`` positions: one open per shard touched, one ``pread`` per row."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        first = np.zeros(len(rows), dtype=np.int64) if first is None else np.asarray(first, dtype=np.int64).reshape(-1)
        position_bytes = self.shape[2] * self.dtype.itemsize
        shards = self.shards[rows]
        for shard in np.unique(shards):
            with open(self.paths[shard], "rb", buffering=0) as handle:
                for i in np.flatnonzero(shards == shard):
                    offset = self._offsets[shard] + int(self.rows[rows[i]]) * self._row_bytes + int(first[i]) * position_bytes
                    pread_exactly(handle.fileno(), out[i], offset, f"{self.paths[shard]}: rebuild the gallery with `spade fit`")
        return out

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Gallery rows ``rows`` into ``out[:len(rows)]`` ((n, positions, channels) float32); returns that view."""
        return self.read_part(rows, None, out)

    def read_part(self, rows: np.ndarray, first: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        """Positions ``first[i]`` .. ``first[i] + out.shape[1]`` of gallery row ``rows[i]`` into ``out[i]`` (float32;
        ``first`` None: whole rows), one ``pread`` each: a tile of a frame without the rest of it."""
        target = out[:len(rows)]
        if self.dtype == target.dtype:
            return self._read(rows, target, first)
        target[...] = self._read(rows, np.empty(target.shape, dtype=self.dtype), first)
        return target


class TileRows:
    """A pyramid layer (N, T*P, C) whose rows are frames of T tiles, seen as (N*T, P, C): row ``r*T + t`` is tile
    t of frame r (its positions t*P .. (t+1)*P). The correspondence then matches a test tile with chosen tiles
    of its neighbour frames, reading whole frames and handing on the tiles asked for."""

    ndim = 3

    def __init__(self, layer, tiles: int):
        self.layer, self.tiles = layer, int(tiles)
        frames, positions, channels = layer.shape
        if positions % self.tiles:
            raise ValueError(f"pyramid rows of {positions} positions do not split into {self.tiles} tiles")
        self.shape = (frames * self.tiles, positions // self.tiles, channels)
        self.dtype = layer.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Tile rows ``rows`` into ``out[:len(rows)]`` ((n, P, C) float32); returns that view."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        target = out[:len(rows)]
        per = self.shape[1]
        if hasattr(self.layer, "read_part"):
            return self.layer.read_part(rows // self.tiles, (rows % self.tiles) * per, target)
        for i, (frame, tile) in enumerate(zip(rows // self.tiles, rows % self.tiles)):
            target[i] = self.layer[frame, tile * per:(tile + 1) * per]  # the tile alone, one copy
        return target

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index]
        out = np.empty((np.size(rows), *self.shape[1:]), dtype=np.float32)
        self.read_rows(np.atleast_1d(rows), out)
        return out[0] if np.ndim(rows) == 0 else out
