"""Deterministic, resumable, random-access loading of token shards.

Training data is one global order per epoch over the split's N sequences, cut into global
batches of `batch_size` sequences. The order (seeded by seed and epoch): the shards in a
random order, then the sequences permuted within consecutive windows of `shuffle_window`
sequences of that stream (a window at least N long is a full permutation). Data-parallel rank
r takes rows [r * b, (r + 1) * b) of each global batch (b = batch_size / world) and loader
worker w builds the batches k with k % workers == w; each reads only those rows, through the
shards' indexes (data/samples.py). So the sequence of global batches depends only on the seed
and the data, never on the layout, each sample appears once per epoch, and the state after a
batch, (epoch, position) of the global order, is all a checkpoint needs to continue exactly,
without reading what came before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from forgetless.data.samples import Samples
from forgetless.data.shards import DataError, Manifest


@dataclass
class StreamSpec:
    manifest: Manifest
    split: str
    batch_size: int  # global: sequences per step over all data-parallel ranks
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle_window: int = 65536
    train: bool = True  # endless and shuffled; else one ordered pass
    limit: int = 0  # with train=False: only the first `limit` sequences (0: all)

    def __post_init__(self) -> None:
        if self.train and self.batch_size % self.world:
            raise DataError(f"batch size {self.batch_size} is not divisible by the "
                            f"{self.world} data-parallel ranks")


class Order:
    """The epoch orders of a split: position in an epoch -> global sample id."""

    def __init__(self, sizes: list[int], seed: int, window: int):
        self.sizes, self.seed, self.window = np.asarray(sizes, dtype=np.int64), seed, window
        self.firsts = np.concatenate([[0], np.cumsum(self.sizes)])  # each shard's first id
        self.n = int(self.firsts[-1])
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _shards(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of an epoch: (first global id of each slot's shard, slot starts)."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.sizes))
        return self.firsts[perm], np.concatenate([[0], np.cumsum(self.sizes[perm])])

    def _window(self, epoch: int, w: int) -> np.ndarray:
        """Global ids of window w of an epoch, in their order (the last two are kept)."""
        if (epoch, w) not in self._cache:
            firsts, starts = self._shards(epoch)
            lo, hi = w * self.window, min((w + 1) * self.window, self.n)
            stream = np.arange(lo, hi)
            slot = np.searchsorted(starts, stream, side="right") - 1
            ids = firsts[slot] + stream - starts[slot]
            rng = np.random.default_rng((self.seed, epoch, w + 1))
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(epoch, w)] = ids[rng.permutation(len(ids))]
        return self._cache[(epoch, w)]

    def ids(self, offsets: np.ndarray) -> np.ndarray:
        """Global sample ids at offsets of the endless stream (offset = epoch * n + position)."""
        out = np.empty(len(offsets), dtype=np.int64)
        epochs, positions = np.divmod(offsets, self.n)
        windows = positions // self.window
        for epoch, w in sorted(set(zip(epochs.tolist(), windows.tolist(), strict=True))):
            mask = (epochs == epoch) & (windows == w)
            out[mask] = self._window(epoch, w)[positions[mask] - w * self.window]
        return out


class TokenStream(IterableDataset):
    """This rank's rows of each global batch [b, seq_len] (int64), with the stream state and
    the bytes this worker has read."""

    def __init__(self, spec: StreamSpec, state: dict | None = None):
        self.spec, self.state = spec, state or {"epoch": 0, "position": 0}
        self.samples = Samples(spec.manifest.shards(spec.split))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict, int]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.spec.train:
            yield from self._endless(worker, n_workers)
        else:
            yield from self._ordered(worker, n_workers)

    def _ordered(self, worker: int, n_workers: int) -> Iterator[tuple[torch.Tensor, dict, int]]:
        spec = self.spec
        n = min(spec.limit, len(self.samples)) if spec.limit else len(self.samples)
        mine = np.arange(spec.rank, n, spec.world)
        for start in range(worker * spec.batch_size, len(mine), n_workers * spec.batch_size):
            ids = mine[start:start + spec.batch_size]
            yield torch.from_numpy(self.samples.read(ids)), {}, self.samples.bytes_read

    def _endless(self, worker: int, n_workers: int) -> Iterator[tuple[torch.Tensor, dict, int]]:
        spec, n = self.spec, len(self.samples)
        if n == 0:
            raise DataError(f"manifest {spec.manifest.path}: the {spec.split} split is empty")
        epoch, position = self.state["epoch"], self.state["position"]
        if not 0 <= position <= n:
            raise DataError(f"loader state: epoch {epoch} has {n} samples, not {position} or "
                            "more; the data changed since the state was saved")
        order = Order([count for _, count in self.samples.shards], spec.seed,
                      spec.shuffle_window)
        rows = spec.batch_size // spec.world
        base = epoch * n + position + spec.rank * rows
        for k in itertools.count(worker, n_workers):
            start = base + k * spec.batch_size
            tokens = self.samples.read(order.ids(np.arange(start, start + rows)))
            end = epoch * n + position + (k + 1) * spec.batch_size  # offset after the batch
            state = {"epoch": (end - 1) // n, "position": (end - 1) % n + 1}
            yield torch.from_numpy(tokens), state, self.samples.bytes_read


class Loader:
    """Iterates batches and keeps the state a checkpoint needs to continue the exact order."""

    def __init__(self, spec: StreamSpec, workers: int = 0, state: dict | None = None):
        self.state = dict(state or {"epoch": 0, "position": 0})
        self.loader = DataLoader(TokenStream(spec, self.state), batch_size=None,
                                 num_workers=workers, persistent_workers=workers > 0)
        self._it: Iterator | None = None
        self._bytes: dict[int, int] = {}  # bytes read by each worker, as last reported
        self._batches = 0  # workers take turns: batch i comes from worker i % workers

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        batch, state, read = next(self._it)
        self._bytes[self._batches % max(1, self.loader.num_workers)] = read
        self._batches += 1
        if state:
            self.state = state
        return batch

    @property
    def bytes_read(self) -> int:
        """Bytes of shards and indexes this rank's loader has read so far (all workers)."""
        return sum(self._bytes.values())

    def state_dict(self) -> dict:
        return dict(self.state)
