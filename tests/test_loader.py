from collections import Counter

import numpy as np
import pytest
import torch

from forgetless.data.loader import Loader, Order, StreamSpec
from forgetless.data.samples import read_split
from forgetless.data.shards import DataError, index_path


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
    everything = Counter(_key(torch.from_numpy(s)) for s in read_split(manifest, "train"))
    n = manifest.sequences("train")
    loader = Loader(StreamSpec(manifest, "train", 1, seed=0))
    first = Counter(_key(b[0]) for b in _take(loader, n))
    assert first == everything
    assert loader.state_dict() == {"epoch": 0, "position": n}
    second = [b[0] for b in _take(loader, n)]
    assert Counter(map(_key, second)) == everything and loader.state_dict()["epoch"] == 1
    assert [_key(r) for r in second] != [_key(b[0]) for b in _take(
        Loader(StreamSpec(manifest, "train", 1, seed=0)), n)]  # a fresh order each epoch


def _overhead(manifest):
    """Bytes of every index of the train split: what a rank may read beyond its rows."""
    return sum(index_path(path).stat().st_size for path, _ in manifest.shards("train"))


def _row_bytes(manifest):
    """Bytes of one sample's tokens.npy member (one positioned read per row)."""
    path, _ = manifest.shards("train")[0]
    return int(np.load(index_path(path))[0, 1])


def test_ranks_and_workers_split_global_batches_exactly(manifest):
    steps = 6
    reference = _take(Loader(StreamSpec(manifest, "train", 8, seed=2)), steps)
    for world, workers in ((2, 0), (2, 2), (4, 0), (4, 2), (8, 2)):
        loaders = [Loader(StreamSpec(manifest, "train", 8, seed=2, rank=r, world=world),
                          workers) for r in range(world)]
        parts = [_take(loader, steps) for loader in loaders]
        for k, batch in enumerate(reference):
            assert torch.equal(torch.cat([p[k] for p in parts]), batch), (world, workers, k)
        for loader in loaders:  # each rank read its rows (and indexes), nothing else
            share = steps * 8 // world * _row_bytes(manifest)
            assert share < loader.bytes_read <= share + workers_or_one(workers) * _overhead(
                manifest), (world, workers)
    with pytest.raises(DataError, match="not divisible by the 3 data-parallel ranks"):
        StreamSpec(manifest, "train", 8, world=3)


def workers_or_one(workers):
    return max(1, workers)


def test_shuffle_windows_keep_each_sample_once_and_stay_local(manifest):
    """With windows of 16 sequences, an epoch is still a permutation, and each window holds
    consecutive sequences of one or two shuffled shards."""
    n = manifest.sequences("train")
    loader = Loader(StreamSpec(manifest, "train", 16, seed=5, shuffle_window=16))
    rows = torch.cat(_take(loader, n // 16)).numpy()
    sizes = [count for _, count in manifest.shards("train")]
    order = Order(sizes, 5, 16).ids(np.arange(len(rows)))
    np.testing.assert_array_equal(rows, read_split(manifest, "train")[order])
    assert len(set(order.tolist())) == len(order) == n // 16 * 16
    shard_of = order // 100  # the fixture's shards hold 100 sequences
    assert all(len(set(shard_of[w:w + 16])) <= 2 for w in range(0, len(order), 16))
    assert (order[1:] < order[:-1]).any()
    full = Order(sizes, 5, n).ids(np.arange(n))  # one window: a full permutation
    assert sorted(full.tolist()) == list(range(n)) and len(set(full[:16] // 100)) > 2


def test_resume_deep_in_an_epoch_reads_no_skipped_sample(manifest):
    n = manifest.sequences("train")
    spec = StreamSpec(manifest, "train", 4, seed=7, world=2, rank=1)
    loader = Loader(spec)
    _take(loader, n // 4 - 2)  # near the end of the first epoch
    state, expected = loader.state_dict(), _take(loader, 5)  # into the second
    resumed = Loader(spec, state=state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _take(resumed, 5), strict=True))
    assert resumed.bytes_read <= 5 * 2 * _row_bytes(manifest) + _overhead(manifest)
    with pytest.raises(DataError, match="the data changed since the state was saved"):
        next(Loader(spec, state={"epoch": 0, "position": n + 1}))


def test_exact_continuation_from_state_across_epochs(manifest):
    n = manifest.sequences("train")
    for workers in (0, 2):
        spec = StreamSpec(manifest, "train", 16, seed=1, shuffle_window=64)
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
