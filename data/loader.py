"""Streaming, deterministic, resumable loading of token shards with webdataset.

Samples are split over (data-parallel rank x loader worker) slots so that each sample is seen
once per epoch by exactly one slot. Each slot's order depends only on (seed, epoch, slot), so a
slot's state is just (epoch, position): resuming skips `position` samples of that epoch.
"""

from __future__ import annotations

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
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 1000
    train: bool = True  # endless and shuffled; else one ordered pass
    limit: int = 0  # with train=False: only the first `limit` sequences (0: all)


def _slot_samples(spec: StreamSpec, epoch: int, slot: int, n_slots: int) -> Iterator[np.ndarray]:
    shards = spec.manifest.shards(spec.split)
    if spec.train:
        random.Random(f"{spec.seed}/{epoch}").shuffle(shards)
    if spec.train and len(shards) >= n_slots:
        samples: Iterator[np.ndarray] = (
            s for path, n in shards[slot::n_slots] for s in read_shard(path, n)
        )
    else:  # fewer shards than slots (or a fixed eval set): split sample by sample
        stream = (s for path, n in shards for s in read_shard(path, n))
        samples = (s for i, s in enumerate(stream) if i % n_slots == slot
                   and (spec.train or not spec.limit or i < spec.limit))
    if spec.train:
        shuffle = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer,
                              seed=f"{spec.seed}/{epoch}/{slot}")
        samples = shuffle(iter(samples))
    return samples


class TokenStream(IterableDataset):
    """Batches [batch_size, seq_len] (int64) with the slot's state after each batch.

    `states` holds one {epoch, position} per worker; `first_worker` rotates which logical
    worker the loader's worker 0 plays, so a resumed loader continues the round-robin order.
    """

    def __init__(self, spec: StreamSpec, states: list[dict] | None = None, first_worker: int = 0):
        self.spec, self.states, self.first_worker = spec, states, first_worker

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict]]:
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.first_worker) % n_workers
        slot, n_slots = self.spec.rank * n_workers + worker, self.spec.world * n_workers
        state = self.states[worker] if self.states else {"epoch": 0, "position": 0}
        epoch, position = state["epoch"], state["position"]
        batch: list[np.ndarray] = []
        while True:
            samples = _slot_samples(self.spec, epoch, slot, n_slots)
            for _ in range(position):
                if next(samples, None) is None:
                    raise DataError(f"loader state: epoch {epoch} has fewer than {position} "
                                    f"samples for this slot; the data changed since it was saved")
            for sample in samples:
                position += 1
                batch.append(sample)
                if len(batch) == self.spec.batch_size:
                    state = {"epoch": epoch, "position": position}
                    yield torch.from_numpy(np.stack(batch)), worker, state
                    batch = []
            if not self.spec.train:
                if batch:
                    yield torch.from_numpy(np.stack(batch)), worker, {"epoch": epoch,
                                                                       "position": position}
                return
            if position == 0:
                raise DataError(f"manifest {self.spec.manifest.path}: no {self.spec.split} "
                                f"sample reaches rank {self.spec.rank}")
            epoch, position = epoch + 1, 0


class Loader:
    """Iterates batches and keeps the state a checkpoint needs to continue the exact order."""

    def __init__(self, spec: StreamSpec, workers: int = 0, state: dict | None = None):
        n = max(workers, 1)
        states, first = None, 0
        if state:
            states, first = state["workers"], state["next"]
            if len(states) != n:
                raise DataError(f"loader state has {len(states)} workers; resume with "
                                f"data_opts.workers={len(states) if len(states) > 1 else 0}")
        self.states = states or [{"epoch": 0, "position": 0} for _ in range(n)]
        self.next = first
        dataset = TokenStream(spec, states, first)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                 persistent_workers=workers > 0)
        self._it: Iterator | None = None

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        batch, worker, state = next(self._it)
        self.states[worker] = state
        self.next = (worker + 1) % len(self.states)
        return batch

    def state_dict(self) -> dict:
        return {"workers": [dict(s) for s in self.states], "next": self.next}
