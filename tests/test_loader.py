from collections import Counter

import pytest
import torch

from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import DataError, read_shard


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


def test_each_sample_once_per_epoch(manifest):
    everything = Counter(_key(torch.from_numpy(s)) for path, n in manifest.shards("train")
                         for s in read_shard(path, n))
    n = manifest.sequences("train")
    loader = Loader(StreamSpec(manifest, "train", 1, seed=0))
    first = Counter(_key(b[0]) for b in _take(loader, n))
    assert first == everything
    assert loader.state_dict() == {"epoch": 0, "position": n}
    second = [b[0] for b in _take(loader, n)]
    assert Counter(map(_key, second)) == everything and loader.state_dict()["epoch"] == 1
    assert [_key(r) for r in second] != [_key(b[0]) for b in _take(
        Loader(StreamSpec(manifest, "train", 1, seed=0)), n)]  # a fresh order each epoch


def test_ranks_and_workers_split_global_batches_exactly(manifest):
    reference = _take(Loader(StreamSpec(manifest, "train", 8, seed=2)), 6)
    for world, workers in ((2, 0), (2, 2), (4, 1), (8, 2)):
        parts = [_take(Loader(StreamSpec(manifest, "train", 8, seed=2, rank=r, world=world),
                              workers), 6) for r in range(world)]
        for k, batch in enumerate(reference):
            assert torch.equal(torch.cat([p[k] for p in parts]), batch), (world, workers, k)
    with pytest.raises(DataError, match="not divisible by the 3 data-parallel ranks"):
        StreamSpec(manifest, "train", 8, world=3)


def test_exact_continuation_from_state_across_epochs(manifest):
    n = manifest.sequences("train")
    for workers in (0, 2):
        spec = StreamSpec(manifest, "train", 16, seed=1, shuffle_buffer=64)
        loader = Loader(spec, workers)
        _take(loader, n // 16 + 3)  # past the first epoch
        state = loader.state_dict()
        assert state["epoch"] == 1
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
