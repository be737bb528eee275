"""3D parallelism on CPU with gloo under torchrun: every layout trains like one process,
checkpoints reshard across layouts, kill -9 and preemption resume exactly."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from forgetless import checkpoint, config, metrics
from forgetless.config import FinetuneConfig, PretrainConfig
from forgetless.recipes import finetune, pretrain

from .test_pretrain import TINY

STEPS = 5
RUN = [*TINY, "model.layers=4", "eval.log_interval=1", "eval.interval=100",
       "opt.warmup_steps=0", "opt.schedule=constant", "threads=1",
       "opt.grad_clip=0.5"]  # below the gradient norms here: every layout clips


def _args(manifest, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data={manifest.path}", *RUN, *extra]


def _torchrun(nproc, program, args, wait=True, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "forgetless", program, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 or not check, out.stderr[-4000:]
    return out


def _per_step(run_dir, key="train_loss"):
    """{step: value} of one metrics.jsonl key (the training loss by default)."""
    return {r["step"]: r[key] for r in metrics.read(run_dir / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """One process, STEPS + 1 steps: the losses and gradient norms every layout must
    reproduce."""
    run_dir = tmp_path_factory.mktemp("single")
    pretrain.run(config.load(PretrainConfig, None,
                             _args(manifest, run_dir, f"stop.steps={STEPS + 1}")))
    return {key: _per_step(run_dir, key) for key in ("train_loss", "grad_norm")}


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.microbatches=2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2_dp2": (4, ["parallel.tp=2"]),
    "pp2_dp2": (4, ["parallel.pp=2", "parallel.microbatches=2"]),
}


_runs: dict = {}


def _trained(name, manifest, tmp_path_factory):
    """The run directory of STEPS steps under a layout (made once per module)."""
    if name not in _runs:
        nproc, layout = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp(name)
        _torchrun(nproc, "pretrain", _args(manifest, run_dir, f"stop.steps={STEPS}", *layout))
        _runs[name] = run_dir
    return _runs[name]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_like_one_process(name, reference, manifest, tmp_path_factory):
    """The gradient norm too: clipping under TP must see every rank's slice."""
    run_dir = _trained(name, manifest, tmp_path_factory)
    for key, expected in reference.items():
        values = _per_step(run_dir, key)
        assert sorted(values) == list(range(1, STEPS + 1))
        for step, value in values.items():
            assert value == pytest.approx(expected[step], abs=1e-5), (name, key, step)


@pytest.mark.parametrize("saved, resumed", [("tp2", "pp2"), ("pp2", "tp2")])
def test_checkpoint_reshards_across_layouts(saved, resumed, reference, manifest,
                                            tmp_path_factory, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(_trained(saved, manifest, tmp_path_factory), run_dir)
    nproc, layout = LAYOUTS[resumed]
    out = _torchrun(nproc, "pretrain", _args(manifest, run_dir, f"stop.steps={STEPS + 1}",
                                             *layout))
    assert f"step_{STEPS:08d} (step {STEPS})" in out.stdout
    assert _per_step(run_dir)[STEPS + 1] == pytest.approx(reference["train_loss"][STEPS + 1],
                                                        abs=1e-5)


def _wait_for(condition, process, what, timeout=240):
    start = time.monotonic()
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()}"
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def _saving(run_dir, step):
    """A save of step `step` or later has begun (its hidden directory, or the checkpoint)."""
    root = run_dir / "checkpoints"
    steps = [checkpoint.step_of(root / p.name.strip(".").removesuffix(".tmp"))
             for p in (root.iterdir() if root.is_dir() else [])]
    return any(s is not None and s >= step for s in steps)


def test_kill_9_then_resume_auto_continues_exactly(manifest, megatron_world, tmp_path):
    """The whole job killed -9 three times, each at a seeded random moment of its second
    checkpoint save; each time the newest complete checkpoint loads, and the restart resumes
    from it, removes what the killed saves left, and ends like an uninterrupted run."""
    args = _args(manifest, tmp_path, "stop.steps=30", "ckpt.interval=4", "ckpt.keep=10")
    rng = random.Random(5)
    saved = None
    for _ in range(3):
        start = checkpoint.step_of(saved) if saved else 0
        job = _torchrun(2, "pretrain", args, wait=False)
        _wait_for(lambda start=start: _saving(tmp_path, start + 8), job, "a second save")
        time.sleep(rng.uniform(0.0, 0.3))
        _kill_tree(job, signal.SIGKILL)
        job.wait()
        saved = checkpoint.latest(tmp_path)
        assert saved is not None and checkpoint.weights(saved)  # complete: it loads
    before = _per_step(tmp_path)
    assert max(before) < 30, "the run finished before the kill"
    partial = tmp_path / "checkpoints" / ".step_00000099.tmp"  # as a killed save leaves it
    (partial / "model").mkdir(parents=True, exist_ok=True)
    out = _torchrun(2, "pretrain", [*args, "resume=auto"])
    assert f"resuming from {saved}" in out.stdout
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    after = _per_step(tmp_path)
    assert sorted(after) == list(range(1, 31))
    for step, loss in before.items():  # the steps the killed runs had done again, identical
        assert after[step] == pytest.approx(loss, abs=1e-6), step
    single = tmp_path / "single"
    pretrain.run(config.load(PretrainConfig, None, _args(manifest, single, "stop.steps=30")))
    for step, loss in _per_step(single).items():
        assert after[step] == pytest.approx(loss, abs=1e-5), step


def _kill_tree(job, sig):
    """torchrun and its workers (the way a scheduler kills a job)."""
    for proc in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
        proc.send_signal(sig)


def _worker(job, rank):
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigterm_saves_one_agreed_checkpoint_and_exits_75(manifest, tmp_path):
    """Also: a second job on the run_dir is refused on every rank, naming the holder."""
    args = _args(manifest, tmp_path, "stop.steps=3000")
    job = _torchrun(2, "pretrain", args, wait=False)
    _wait_for(lambda: len(_per_step(tmp_path)) >= 2 if (tmp_path / "metrics.jsonl").exists()
              else False, job, "two steps")
    second = _torchrun(2, "pretrain", args, check=False)
    assert second.returncode != 0 and second.stderr.count("is in use by another trainer") == 2
    assert f"pid {_worker(job, 0).pid}" in second.stderr
    _worker(job, 1).send_signal(signal.SIGTERM)  # one rank only: the others must agree
    output = job.communicate(timeout=240)[0]
    assert job.returncode != 0
    assert re.search(r"exitcode\s*: 75", output), output[-3000:]
    assert "preempted: checkpoint" in output
    dirs = checkpoint.checkpoint_dirs(tmp_path)
    assert len(dirs) == 1
    step = checkpoint.read_state(dirs[0])["step"]
    assert 2 <= step < 3000 and max(_per_step(tmp_path)) == step
    _torchrun(2, "pretrain", _args(manifest, tmp_path, f"stop.steps={step + 2}"))
    assert max(_per_step(tmp_path)) == step + 2


FINETUNES = {"kl_pre": ["method=kl_pre", "replay.source=real", "replay.batch_size=4"],
             "lora": ["method=lora"]}


@pytest.mark.parametrize("method", FINETUNES)
def test_finetune_with_tp2_matches_one_process(method, world, megatron_world, tmp_path):
    args = [f"checkpoint={world['base']}", f"data={world['down'].path}", *FINETUNES[method],
            "opt.batch_size=8", "stop.tokens=null", f"stop.steps={STEPS}", "eval.interval=100",
            "eval.log_interval=1", "eval.max_sequences=16", "threads=1",
            "opt.grad_clip=0.3"]  # kl_pre's norms are above it: clipped under both layouts
    finetune.run(config.load(FinetuneConfig, None, [f"run_dir={tmp_path / 'one'}", *args]))
    _torchrun(2, "finetune", [f"run_dir={tmp_path / 'tp2'}", "parallel.tp=2", *args])
    one, tp2 = (metrics.read(tmp_path / name / "metrics.jsonl") for name in ("one", "tp2"))
    assert tp2[0]["prev_kl"] == 0.0 and tp2[0]["prev_ntp"] == pytest.approx(one[0]["prev_ntp"])
    assert [r["step"] for r in tp2] == list(range(STEPS + 1))
    for a, b in zip(one[1:], tp2[1:], strict=True):
        for key in ("train_loss", "grad_norm", "down_loss", "reg_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (method, a["step"], key)
    if method == "kl_pre":
        assert tp2[-1]["reg_loss"] > 0  # the student moved away from the teacher


def test_rank_0_alone_hashes_and_every_rank_gets_the_digest(layout_runs):
    import torch

    for _, out in layout_runs.values():
        ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
        assert [r["digest_calls"] for r in ranks] == [1, 0]
        assert [r["digest"] for r in ranks] == ["c0ffee" * 10] * 2
