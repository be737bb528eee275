"""The GPU fast path's switches: resolved per machine and layout, refused where they cannot
apply (naming the key and what is missing); recomputation trains exactly like none."""

import pytest

from forgetless import config, fast_path, metrics
from forgetless.config import ConfigError, GenerateConfig, ParallelConfig, PretrainConfig
from forgetless.recipes import pretrain

from .test_pretrain import TINY


def test_auto_is_the_cpu_path_here_and_on_names_what_is_missing():
    assert fast_path.resolve(ParallelConfig(), 32, dp=2) == fast_path.OFF
    assert fast_path.resolve(ParallelConfig(recompute="full"), 32, 1).recompute == "full"
    for key, extra, missing in (
            ("sequence_parallel", {}, "CUDA GPUs; parallel.tp > 1; transformer_engine"),
            ("sequence_parallel", {"tp": 2}, "CUDA GPUs; transformer_engine"),
            ("overlap_grad_reduce", {}, "CUDA GPUs; more than one data-parallel rank"),
            ("overlap_param_gather", {}, "CUDA GPUs; parallel.distributed_optimizer=true; "
                                         "parallel.overlap_grad_reduce"),
            ("fusions", {}, "CUDA GPUs")):
        with pytest.raises(ConfigError, match=f"parallel.{key}: on, but it needs {missing}"):
            fast_path.resolve(ParallelConfig(**{key: "on", **extra}), 33, dp=1)
    with pytest.raises(ConfigError, match="parallel.fusions: 'yes' is not one of auto, on, off"):
        ParallelConfig(fusions="yes")
    with pytest.raises(ConfigError, match="parallel.recompute: 'some' is not one of none"):
        ParallelConfig(recompute="some")
    with pytest.raises(ConfigError, match="parallel.recompute: applies to training"):
        config.load(GenerateConfig, None, ["parallel.recompute=full"])


def test_pretrain_on_cpu_refuses_a_switch_it_cannot_apply(manifest, megatron_world, tmp_path):
    cfg = config.load(PretrainConfig, None, [f"run_dir={tmp_path}", f"data={manifest.path}",
                                             *TINY, "parallel.overlap_grad_reduce=on"])
    with pytest.raises(ConfigError, match="parallel.overlap_grad_reduce: on, but it needs"):
        pretrain.run(cfg)


def test_recomputation_trains_exactly_like_none(manifest, megatron_world, tmp_path,
                                                monkeypatch):
    """Selective (core attention) and full (every layer) recomputation: megatron's checkpoint
    runs, and the losses are the same."""
    from megatron.core import tensor_parallel

    checkpoint, recomputed = tensor_parallel.checkpoint, []

    def counting(*args, **kwargs):
        recomputed.append(recompute)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(tensor_parallel, "checkpoint", counting)
    losses = {}
    for recompute in ("none", "selective", "full"):
        run_dir = tmp_path / recompute
        pretrain.run(config.load(PretrainConfig, None, [
            f"run_dir={run_dir}", f"data={manifest.path}", *TINY, "stop.steps=3",
            "eval.log_interval=1", f"parallel.recompute={recompute}"]))
        losses[recompute] = [r["train_loss"] for r in metrics.read(run_dir / "metrics.jsonl")
                             if "train_loss" in r]
    assert len(losses["none"]) == 3 and "none" not in recomputed
    assert {"selective", "full"} <= set(recomputed)
    assert losses["selective"] == losses["none"] == losses["full"]


def test_cpu_runs_keep_freed_host_memory():
    """glibc takes the settings (this machine's C library is glibc)."""
    from forgetless import host_memory

    assert host_memory.keep_freed_memory()
