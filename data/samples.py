"""Random access to the sequences of token shards, through a per-shard index.

Each shard `train-000000.tar` has an index `train-000000.tar.idx` beside it, written with the
shard: an int64 .npy of shape [sequences, 2], the byte offset and size of each sample's
tokens.npy member in the tar. A reader then fetches any sequence with one positioned read, so
a data-parallel rank (or a loader worker) reads only its own rows.

Why not webdataset's `wids`: it is no longer part of webdataset (1.0 dropped it; it lives on
as a separate 0.1 package), and it indexes a tar either by walking every member header, which
for short sequences reads the whole shard, or from a pickled index it writes beside the shard.
Shards without an index (made before indexes existed) are indexed in memory on first use by
walking the tar once (and read in full, so `bytes_read` counts them whole).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from forgetless.data.shards import DataError, Manifest, index_path, scan_index

OPEN_SHARDS = 64  # file descriptors a reader keeps open (shards are read in windows)


class Samples:
    """The sequences of a list of shards as one indexable array (global ids in shard order),
    counting the bytes it reads."""

    def __init__(self, shards: list[tuple[Path, int]]):
        self.shards = shards
        self.starts = np.cumsum([0] + [n for _, n in shards])
        self.indexes: dict[int, np.ndarray] = {}
        self.files: OrderedDict[int, int] = OrderedDict()
        self.bytes_read = 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _index(self, k: int) -> np.ndarray:
        if k not in self.indexes:
            path, expected = self.shards[k]
            idx = index_path(path)
            if idx.exists():
                self.bytes_read += idx.stat().st_size
                index = np.load(idx)
            else:
                self.bytes_read += path.stat().st_size
                index = scan_index(path)
            if len(index) != expected:
                raise DataError(f"shard {path}: holds {len(index)} sequences, the manifest "
                                f"says {expected}")
            self.indexes[k] = index
        return self.indexes[k]

    def _fd(self, k: int) -> int:
        if k in self.files:
            self.files.move_to_end(k)
        else:
            if len(self.files) >= OPEN_SHARDS:
                os.close(self.files.popitem(last=False)[1])
            self.files[k] = os.open(self.shards[k][0], os.O_RDONLY)
        return self.files[k]

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Sequences [len(ids), seq_len] (int64) for global ids."""
        if len(ids) == 0:
            return np.empty((0, 0), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        out = []
        for i, k in zip(ids.tolist(), shard_of.tolist(), strict=True):
            offset, size = self._index(k)[i - self.starts[k]]
            data = os.pread(self._fd(k), int(size), int(offset))
            self.bytes_read += len(data)
            out.append(self._decode(k, data, int(size)))
        return np.stack(out)

    def _decode(self, k: int, data: bytes, size: int) -> np.ndarray:
        path = self.shards[k][0]
        if len(data) != size:
            raise DataError(f"shard {path}: truncated (a sample ends past the end of the file)")
        try:
            return np.load(io.BytesIO(data)).astype(np.int64)
        except (ValueError, EOFError) as e:
            raise DataError(f"shard {path}: corrupt sample ({e}); prepare the data again") from e

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def __getstate__(self) -> dict:  # loader workers open their own files
        return {**self.__dict__, "files": OrderedDict()}


def read_split(manifest: Manifest, split: str) -> np.ndarray:
    """Every sequence of a split [n, seq_len] (int64), in shard order."""
    samples = Samples(manifest.shards(split))
    try:
        return samples.read(np.arange(len(samples)))
    finally:
        samples.close()
