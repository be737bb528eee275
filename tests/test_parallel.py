"""3D parallelism on CPU with gloo under torchrun: every layout trains like one process,
checkpoints reshard across layouts, kill -9 and preemption resume exactly."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from forgetless import checkpoint, config, metrics
from forgetless.config import PretrainConfig
from forgetless.recipes import pretrain

from .test_pretrain import TINY

STEPS = 5
RUN = [*TINY, "model.layers=4", "eval.log_interval=1", "eval.interval=100",
       "opt.warmup_steps=0", "opt.schedule=constant", "threads=1"]


def _args(manifest, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data={manifest.path}", *RUN, *extra]


def _torchrun(nproc, program, args, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "forgetless", program, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _losses(run_dir):
    return {r["step"]: r["train_loss"] for r in metrics.read(run_dir / "metrics.jsonl")
            if "train_loss" in r}


@pytest.fixture(scope="module")
def reference(manifest, megatron_world, tmp_path_factory):
    """One process, STEPS + 1 steps: the losses every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("single")
    pretrain.run(config.load(PretrainConfig, None,
                             _args(manifest, run_dir, f"stop.steps={STEPS + 1}")))
    return _losses(run_dir)


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.microbatches=2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2_dp2": (4, ["parallel.tp=2"]),
    "pp2_dp2": (4, ["parallel.pp=2", "parallel.microbatches=2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_like_one_process(name, reference, manifest, tmp_path):
    nproc, layout = LAYOUTS[name]
    _torchrun(nproc, "pretrain", _args(manifest, tmp_path, f"stop.steps={STEPS}", *layout))
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), (name, step)
