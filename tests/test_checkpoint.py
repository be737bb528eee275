"""Run directories and checkpoints on disk: atomic publishing, fsync, crash hygiene under
kill -9, retention by step, resume refusals, load errors, and the one-writer lock."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from forgetless import atomic, checkpoint, engine, runlock
from forgetless.recipes import pretrain

from .test_pretrain import _cfg


def _tree(path: Path, value: int) -> None:
    """A small directory whose every file says `value` (so a mix of two writes shows)."""
    (path / "model").mkdir(parents=True)
    for name in ("model/a", "model/b", "state"):
        (path / name).write_text(str(value) * 500)


def _value(path: Path) -> int:
    """The value a complete tree holds; fails on a partial or mixed one."""
    values = {(path / name).read_text() for name in ("model/a", "model/b", "state")}
    assert len(values) == 1, f"{path} mixes writes"
    text = values.pop()
    digits = text[: len(text) // 500]
    assert text == digits * 500, f"{path} is partly written"
    return int(digits)


def _publish(final: Path, value: int) -> None:
    tmp = atomic.tmp_name(final)
    _tree(tmp, value)
    atomic.publish_dir(tmp, final)


def test_publish_dir_replaces_in_one_step_and_cleans_up(tmp_path, monkeypatch):
    final = tmp_path / "entry"
    _publish(final, 1)
    # a killed publisher's leftovers are removed by the next publisher of that name
    (tmp_path / ".entry.old-99999").mkdir()
    (tmp_path / ".entry.tmp-99998").mkdir()
    (tmp_path / ".other.tmp-99997").mkdir()
    real_replace = os.replace

    def replace_keeping_final(src, dst):  # no moment without a directory at the final name
        real_replace(src, dst)
        assert final.is_dir(), f"no {final} after renaming {src} -> {dst}"

    monkeypatch.setattr(os, "replace", replace_keeping_final)
    _publish(final, 2)
    assert _value(final) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-99997", "entry"]
    monkeypatch.setattr(os, "replace", real_replace)
    # where the filesystem cannot exchange names: the old one moved aside, then removed
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _publish(final, 3)
    assert _value(final) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-99997", "entry"]


def test_what_is_published_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = tmp_path / "entry"
    tmp = atomic.tmp_name(final)
    _tree(tmp, 1)
    written = {str(p) for p in tmp.rglob("*")} | {str(tmp)}
    atomic.publish_dir(tmp, final)
    assert written <= set(synced[:-1]), written - set(synced)  # every file and directory
    assert synced[-1] == str(tmp_path)  # then the rename itself
    synced.clear()
    atomic.atomic_write_text(tmp_path / "x.json", "{}")
    assert synced[-1] == str(tmp_path) and len(synced) == 2


# The checkpoint file protocol without megatron: like checkpoint.save, a hidden .step_N.tmp
# published as step_N; and a cache entry republished under one name (the exchange path).
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from forgetless.atomic import publish_dir, tmp_name
    root, step, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def tree(path, value):
        (path / "model").mkdir(parents=True)
        for name in ("model/a", "model/b", "state"):
            (path / name).write_text(str(value) * 500)
    print("ready", flush=True)
    for step in range(step + 1, step + 1 + rounds):
        final = root / "checkpoints" / f"step_{step:08d}"
        tree(root / "checkpoints" / f".{final.name}.tmp", step)
        publish_dir(root / "checkpoints" / f".{final.name}.tmp", final)
        entry = root / "entry"
        tree(tmp_name(entry), step)
        publish_dir(tmp_name(entry), entry)
""")


def _child(root: Path, step: int, rounds: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(step), str(rounds)],
                            stdout=subprocess.PIPE, text=True)


def test_kill_9_during_publishing_leaves_the_newest_complete(tmp_path):
    """17 kills at seeded random times; after each, the restart hygiene (checkpoint.clean)
    leaves only complete checkpoints, the newest loadable, and the entry always present."""
    (tmp_path / "checkpoints").mkdir()
    rng = random.Random(11)
    step, kills, entry = 0, 0, None
    while kills < 17:
        child = _child(tmp_path, step, 100_000)
        assert child.stdout.readline() == "ready\n"
        try:
            child.wait(timeout=rng.uniform(0.0, 0.15))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
        checkpoint.clean(tmp_path)
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
        newest = checkpoint.latest(tmp_path)
        if newest is not None:
            assert _value(newest) == checkpoint.step_of(newest)
            step = checkpoint.step_of(newest)
        # once published the entry never goes missing nor goes back, and never runs ahead of
        # the checkpoints (it is written after its own; a kill between the two leaves it behind)
        if entry is not None or (tmp_path / "entry").exists():
            value = _value(tmp_path / "entry")
            assert (entry or 0) <= value <= step
            entry = value
    assert step > 0
    # the next publisher of the entry removes what the killed ones left beside it
    done = _child(tmp_path, step, 1)
    assert done.wait(timeout=60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "entry"]
    assert _value(tmp_path / "entry") == step + 1


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    (path / "model").mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    return path


def test_retention_and_resume_order_by_step(tmp_path):
    for step in (99_999_999, 100_000_000, 7):  # past 10^8 names sort wrongly
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_notes").mkdir()
    (tmp_path / "checkpoints" / ".step_100000001.tmp" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step_5.old-12").mkdir()
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoint_dirs(tmp_path)] == [
        7, 99_999_999, 100_000_000]
    assert checkpoint.latest(tmp_path).name == "step_100000000"
    assert [p.name for p in checkpoint.clean(tmp_path)] == [".step_100000001.tmp",
                                                           ".step_5.old-12"]
    checkpoint.prune(tmp_path, 2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == [
        "step_99999999", "step_100000000"]
    assert checkpoint.resume_path(tmp_path, "auto").name == "step_100000000"
    assert checkpoint.resume_path(tmp_path, str(tmp_path)).name == "step_100000000"


def test_resuming_behind_the_newest_checkpoint_is_refused(tmp_path):
    older, _ = _fake_checkpoint(tmp_path, 4), _fake_checkpoint(tmp_path, 8)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"at step 4 but .* holds newer checkpoints \(step_00000008\); "
                             r"move them out of"):
        checkpoint.resume_path(tmp_path, str(older))
    elsewhere = _fake_checkpoint(tmp_path / "other", 2)  # from another run: the same rule
    with pytest.raises(checkpoint.CheckpointError, match="step_00000004, step_00000008"):
        checkpoint.resume_path(tmp_path, str(elsewhere))
    assert checkpoint.resume_path(tmp_path, str(tmp_path / "checkpoints" / "step_00000008"))
    assert (tmp_path / "checkpoints" / "step_00000008").is_dir()


class _Model(torch.nn.Module):
    def sharded_state_dict(self) -> dict:
        return {}


@pytest.mark.parametrize("error, user", [
    (CheckpointingException("Global shape mismatch for loaded tensor"), True),
    (CheckpointException("load", {0: (EOFError(), None)}), True),
    (RuntimeError("Error(s) in loading state_dict for GPTModel: size mismatch"), True),
    (FileNotFoundError("common.pt"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error"), False),
    (CheckpointException("load", {1: (RuntimeError("NCCL error: timeout"), None)}), False),
])
def test_load_maps_only_checkpoint_errors(tmp_path, monkeypatch, error, user):
    path = _fake_checkpoint(tmp_path, 1)

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine.dist_checkpointing, "load", failing_load)
    if user:
        with pytest.raises(checkpoint.CheckpointError, match=f"{path}: cannot be loaded"):
            checkpoint.load(path, _Model())
    else:  # out of memory, NCCL: the machine's fault, raised unchanged with its traceback
        with pytest.raises(type(error)) as raised:
            checkpoint.load(path, _Model())
        assert raised.value is error


HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from forgetless import runlock
    lock = runlock.acquire(Path(sys.argv[1]))
    child = os.fork()  # a forked child (like a loader worker) must not keep the lock alive
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
""")


def test_a_second_trainer_on_a_locked_run_dir_is_refused(manifest, megatron_world, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "SLURM_JOB_ID": "700", "SLURM_ARRAY_JOB_ID": "699",
           "SLURM_ARRAY_TASK_ID": "3"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=env,
                              stdout=subprocess.PIPE, text=True)
    forked = int(holder.stdout.readline())
    try:
        info = runlock.holder(run_dir)
        assert info["pid"] == holder.pid and info["slurm_job"] == "699_3" and info["host"]
        named = rf"host {info['host']}, pid {holder.pid}, SLURM job 699_3"
        with pytest.raises(runlock.RunDirBusy, match=named):
            runlock.acquire(run_dir)
        with pytest.raises(runlock.RunDirBusy, match=rf"run_dir {run_dir} is in use.*{named}"):
            pretrain.run(_cfg(manifest, run_dir, "stop.steps=1"))
        assert not (run_dir / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert runlock.holder(run_dir) is None  # its forked child lives on, without the lock
        pretrain.run(_cfg(manifest, run_dir, "stop.steps=1"))
        assert runlock.holder(run_dir) is None  # released when the run returned
        assert checkpoint.latest(run_dir).name == "step_00000001"
    finally:
        holder.kill()
        os.kill(forked, signal.SIGKILL)
