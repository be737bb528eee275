"""engine=deepspeed: ZeRO 1, 2 and 3 (with CPU offload too) on 2 processes take the steps
megatron's engine takes on one, resume exactly after kill -9 and SIGTERM, and export the same
model."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless import checkpoint, config, metrics
from forgetless.config import ExportConfig, FinetuneConfig
from forgetless.recipes import export, finetune

from .test_parallel import _kill_tree, _per_step, _torchrun, _wait_for, _worker

STEPS = 5
METHODS = {"none": ["method=none"],
           "kl_pre": ["method=kl_pre", "replay.source=real", "replay.batch_size=4"]}
ZERO = {"zero1": ["deepspeed.stage=1"], "zero2": ["deepspeed.stage=2"],
        "zero3": ["deepspeed.stage=3"],
        "zero3_offload": ["deepspeed.stage=3", "deepspeed.offload_optimizer=cpu",
                          "deepspeed.offload_param=cpu"]}
RUNS = [(zero, method) for zero in ZERO for method in METHODS
        if zero != "zero3_offload" or method == "kl_pre"]
COMPARED = ("train_loss", "grad_norm", "down_loss", "reg_loss")


def _args(world, method, *extra):
    return [f"checkpoint={world['base']}", f"data={world['down'].path}", *METHODS[method],
            "opt.batch_size=8", "stop.tokens=null", "eval.interval=100", "eval.log_interval=1",
            "eval.max_sequences=16", "threads=1",
            "opt.grad_clip=0.3",  # below kl_pre's norms: clipping is active in both engines
            *extra]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """megatron's engine, one process: each method's run directory (kl_pre: 8 steps, a
    checkpoint at step 5)."""
    root = tmp_path_factory.mktemp("megatron")
    for method, steps in (("none", STEPS), ("kl_pre", 8)):
        finetune.run(config.load(FinetuneConfig, None, [
            f"run_dir={root / method}", *_args(world, method, f"stop.steps={steps}",
                                               "ckpt.interval=5", "ckpt.keep=5")]))
    return root


@pytest.fixture(scope="module")
def zero_runs(world, tmp_path_factory):
    """Every (ZeRO setting, method) run on 2 processes, in one torchrun job."""
    root = tmp_path_factory.mktemp("zero")
    runs = [[f"run_dir={root / f'{zero}-{method}'}", "engine=deepspeed", *ZERO[zero],
             *_args(world, method, f"stop.steps={STEPS}")] for zero, method in RUNS]
    (root / "runs.json").write_text(json.dumps(runs))
    script = Path(__file__).with_name("zero_check.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(script), str(root / "runs.json")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return root


@pytest.mark.parametrize("zero, method", RUNS)
def test_zero_takes_megatrons_steps(zero, method, zero_runs, reference):
    ours = metrics.read(zero_runs / f"{zero}-{method}" / "metrics.jsonl")
    theirs = metrics.read(reference / method / "metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(STEPS + 1))
    for key in ("prev_ntp", "valid_ntp", "prev_kl"):
        assert ours[0][key] == pytest.approx(theirs[0][key], abs=1e-6), key
    assert ours[0]["prev_kl"] == 0.0  # the student starts as the teacher, partitioned or not
    for a, b in zip(theirs[1:STEPS + 1], ours[1:], strict=True):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (zero, method, a["step"], key)
    if method == "kl_pre":
        none = metrics.read(zero_runs / f"{zero}-none" / "metrics.jsonl") \
            if (zero_runs / f"{zero}-none").exists() else theirs
        assert ours[1]["reg_loss"] == 0.0  # KL at step 0: exactly zero, and its gradient
        assert ours[1]["grad_norm"] == pytest.approx(none[1]["grad_norm"], rel=1e-6)
        assert ours[-1]["reg_loss"] > 0


def test_zero3_resumes_exactly_after_kill_9_and_sigterm(world, reference, tmp_path):
    """kill -9 once a checkpoint is complete, then SIGTERM to one rank: each restart continues
    from the newest checkpoint, and the run ends with the uninterrupted run's losses."""
    args = [f"run_dir={tmp_path}", "engine=deepspeed", "deepspeed.stage=3",
            *_args(world, "kl_pre", "stop.steps=8", "ckpt.interval=2", "ckpt.keep=2")]
    job = _torchrun(2, "finetune", args, wait=False)
    _wait_for(lambda: checkpoint.latest(tmp_path) is not None, job, "a checkpoint")
    _kill_tree(job, signal.SIGKILL)
    job.wait()
    saved = checkpoint.step_of(checkpoint.latest(tmp_path))
    log = tmp_path / "metrics.jsonl"
    killed = log.stat().st_ino  # a resumed run rewrites the log without the killed run's tail
    job = _torchrun(2, "finetune", args, wait=False)
    _wait_for(lambda: log.stat().st_ino != killed and max(_per_step(tmp_path)) > saved, job,
              "a step after resuming")
    _worker(job, 1).send_signal(signal.SIGTERM)
    output = job.communicate(timeout=300)[0]
    assert f"step_{saved:08d} (step {saved})" in output
    assert re.search(r"exitcode\s*: 75", output), output[-3000:]
    _torchrun(2, "finetune", args)
    ours, theirs = _per_step(tmp_path), _per_step(reference / "kl_pre")
    assert sorted(ours) == list(range(1, 9))
    for step, loss in theirs.items():
        assert ours[step] == pytest.approx(loss, abs=1e-5), step


def test_export_of_a_zero3_checkpoint_is_megatrons_model(zero_runs, reference, world,
                                                         tmp_path):
    outs = {}
    for name, run in (("zero3", zero_runs / "zero3-kl_pre"), ("megatron", reference / "kl_pre")):
        outs[name] = tmp_path / name
        export.run(config.load(ExportConfig, None, [
            f"checkpoint={run / 'checkpoints' / f'step_{STEPS:08d}'}", f"out={outs[name]}"]))
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {name: AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
              for name, out in outs.items()}
    assert torch.allclose(logits["zero3"], logits["megatron"], atol=1e-4)


def test_one_process_bf16_zero3_takes_megatrons_steps(world, tmp_path, monkeypatch):
    """A plain `forgetless finetune` (no torchrun, so no LOCAL_RANK) with bf16 weights: the
    engines round alike, so their losses agree to bf16's precision."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    runs = {}
    for name, engine in (("megatron", []), ("zero3", ["engine=deepspeed"])):
        finetune.run(config.load(FinetuneConfig, None, [
            f"run_dir={tmp_path / name}", *engine, "opt.precision=bf16",
            *_args(world, "kl_pre", "stop.steps=3")]))
        runs[name] = _per_step(tmp_path / name)
    assert sorted(runs["zero3"]) == [1, 2, 3]
    for step, loss in runs["megatron"].items():
        assert runs["zero3"][step] == pytest.approx(loss, abs=1e-3), step


def test_resuming_with_another_engine_is_refused(reference, world, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "kl_pre", run_dir)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"saved with engine=megatron, distributed_optimizer=False, "
                             r"resumed with engine=deepspeed, deepspeed=\{'stage': 2\}"):
        finetune.run(config.load(FinetuneConfig, None, [
            f"run_dir={run_dir}", "engine=deepspeed", "deepspeed.stage=2",
            *_args(world, "kl_pre", "stop.steps=9")]))
