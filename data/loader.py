"""Streaming, deterministic, resumable loading of token shards with webdataset.

Training data is one global stream per epoch (shards and a shuffle buffer ordered by
(seed, epoch)), cut into global batches of `batch_size` sequences. Data-parallel rank r takes
rows [r * b, (r + 1) * b) of each global batch (b = batch_size / world), and loader worker w
builds the batches k with k % workers == w. So the sequence of global batches depends only on
the seed and the data, never on the layout: DP=2 trains on exactly what one process trains
on, and each sample appears once per epoch. The state after a batch, (epoch, position) of
the global stream, is all a checkpoint needs to continue the exact order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from forgetless.data.shards import DataError, Manifest, read_shard


@dataclass
class StreamSpec:
    manifest: Manifest
    split: str
    batch_size: int  # global: sequences per step over all data-parallel ranks
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 1000
    train: bool = True  # endless and shuffled; else one ordered pass
    limit: int = 0  # with train=False: only the first `limit` sequences (0: all)

    def __post_init__(self) -> None:
        if self.train and self.batch_size % self.world:
            raise DataError(f"batch size {self.batch_size} is not divisible by the "
                            f"{self.world} data-parallel ranks")


def _epoch(spec: StreamSpec, epoch: int) -> Iterator[np.ndarray]:
    shards = spec.manifest.shards(spec.split)
    if not spec.train:
        return (s for path, n in shards for s in read_shard(path, n))
    random.Random(f"{spec.seed}/{epoch}").shuffle(shards)
    samples = (s for path, n in shards for s in read_shard(path, n))
    shuffle = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer,
                          seed=f"{spec.seed}/{epoch}")
    return shuffle(samples)


def _endless(spec: StreamSpec, epoch: int, position: int
             ) -> Iterator[tuple[np.ndarray, int, int]]:
    """(sample, epoch, position after it) from a saved point on, epoch after epoch."""
    while True:
        samples = _epoch(spec, epoch)
        for _ in range(position):
            if next(samples, None) is None:
                raise DataError(f"loader state: epoch {epoch} has fewer than {position} "
                                "samples; the data changed since the state was saved")
        seen = position
        for sample in samples:
            seen += 1
            yield sample, epoch, seen
        if seen == 0:
            raise DataError(f"manifest {spec.manifest.path}: the {spec.split} split is empty")
        epoch, position = epoch + 1, 0


class TokenStream(IterableDataset):
    """This rank's rows of each global batch [b, seq_len] (int64), with the stream state."""

    def __init__(self, spec: StreamSpec, state: dict | None = None):
        self.spec, self.state = spec, state or {"epoch": 0, "position": 0}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        spec = self.spec
        if not spec.train:
            samples = itertools.islice(_epoch(spec, 0), spec.limit or None)
            mine = (s for i, s in enumerate(samples) if i % spec.world == spec.rank)
            while batch := list(itertools.islice(mine, spec.batch_size)):
                yield torch.from_numpy(np.stack(batch)), {}
            return
        rows = spec.batch_size // spec.world
        first = spec.rank * rows
        stream = _endless(spec, self.state["epoch"], self.state["position"])
        for k in itertools.count():
            batch = list(itertools.islice(stream, spec.batch_size))
            if k % n_workers == worker:
                _, epoch, position = batch[-1]
                tokens = np.stack([s for s, _, _ in batch[first:first + rows]])
                yield torch.from_numpy(tokens), {"epoch": epoch, "position": position}


class Loader:
    """Iterates batches and keeps the state a checkpoint needs to continue the exact order."""

    def __init__(self, spec: StreamSpec, workers: int = 0, state: dict | None = None):
        self.state = dict(state or {"epoch": 0, "position": 0})
        self.loader = DataLoader(TokenStream(spec, self.state), batch_size=None,
                                 num_workers=workers, persistent_workers=workers > 0)
        self._it: Iterator | None = None

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        batch, state = next(self._it)
        if state:
            self.state = state
        return batch

    def state_dict(self) -> dict:
        return dict(self.state)
