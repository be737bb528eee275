from collections import Counter

import torch
from torch.utils.data import DataLoader

from forgetless.data.loader import Loader, StreamSpec, TokenStream
from forgetless.data.shards import read_shard


def _key(row: torch.Tensor) -> bytes:
    return row.numpy().tobytes()


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_same_seed_same_order_other_seed_other_order(manifest):
    a = _take(Loader(StreamSpec(manifest, "train", 8, seed=3)), 5)
    b = _take(Loader(StreamSpec(manifest, "train", 8, seed=3)), 5)
    c = _take(Loader(StreamSpec(manifest, "train", 8, seed=4)), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (8, 32) and a[0].dtype == torch.int64


def _first_epoch(spec, workers):
    """Samples each (rank, worker) slot yields in epoch 0."""
    seen = []
    finished = set()
    for batch, worker, state in DataLoader(TokenStream(spec), batch_size=None,
                                           num_workers=workers):
        if state["epoch"] == 0:
            seen.extend(_key(r) for r in batch)
        else:
            finished.add(worker)
            if len(finished) == workers:
                return seen
    raise AssertionError("unreachable")


def test_ranks_and_workers_split_each_epoch_exactly(manifest):
    everything = Counter(_key(torch.from_numpy(s)) for path, n in manifest.shards("train")
                         for s in read_shard(path, n))
    for world, workers in ((2, 2), (3, 1), (8, 2)):  # shard-level and sample-level splits
        parts = [Counter(_first_epoch(StreamSpec(manifest, "train", 1, seed=0, rank=r,
                                                 world=world), workers))
                 for r in range(world)]
        assert sum(parts, Counter()) == everything, (world, workers)


def test_exact_continuation_from_state_across_epochs(manifest):
    n = manifest.sequences("train")
    for workers in (0, 2):
        spec = StreamSpec(manifest, "train", 16, seed=1, shuffle_buffer=64)
        loader = Loader(spec, workers)
        _take(loader, n // 16 + 3)  # past the first epoch
        state = loader.state_dict()
        assert max(s["epoch"] for s in state["workers"]) >= 1
        expected = _take(loader, 12)
        resumed = _take(Loader(spec, workers, state), 12)
        assert all(torch.equal(x, y) for x, y in zip(expected, resumed, strict=True)), workers


def test_validation_set_is_fixed_and_limited(manifest):
    spec = StreamSpec(manifest, "valid", 7, train=False, limit=20)
    first = torch.cat(list(Loader(spec)))
    again = torch.cat(list(Loader(spec)))
    assert torch.equal(first, again) and first.shape[0] == 20
    halves = [torch.cat(list(Loader(StreamSpec(manifest, "valid", 7, rank=r, world=2,
                                               train=False, limit=20)))) for r in (0, 1)]
    assert sorted(map(_key, torch.cat(halves))) == sorted(map(_key, first))
