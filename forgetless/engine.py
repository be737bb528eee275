"""Training engines: what wraps the one model definition for a training step, and saves and
restores the state that step needs beyond the weights.

Two engines, chosen by `engine=`: megatron's (DDP and its optimizer, optionally distributed;
every TP x PP x DP layout) here, and DeepSpeed ZeRO 1-3 (forgetless/zero.py). The loop
(forgetless/train.py), methods, data and metrics are the same for both. Every checkpoint holds
the weights as a megatron distributed checkpoint (`model/`, any layout loads it: generate,
evaluate, export), plus the engine's own state for an exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from forgetless import schedule
from forgetless.config import OptConfig, ParallelConfig
from forgetless.fast_path import OFF, FastPath
from forgetless.optim import build_optimizer


class Engine(Protocol):
    """A model being trained, as the loop and checkpoints see it."""

    model: torch.nn.Module  # what forward passes go through (evaluation, replay sampling)

    @property
    def param_groups(self) -> list[dict]: ...  # the optimizer's (the loop sets their lr)

    def step(self, micros: list[schedule.Micro]) -> tuple[list[dict], float]:
        """Forward and backward every microbatch, then update: (last-stage records, grad norm
        before clipping)."""

    def synced(self) -> contextmanager:
        """The current weights in the model's parameters (for an evaluation or a save)."""

    def settings(self) -> dict:
        """Recorded in state.json; a resume must find the same."""

    def save(self, directory: Path) -> None:
        """Weights into directory/model (every rank calls it), and the engine's state."""

    def load(self, directory: Path) -> None:
        """What `save` wrote, into this engine (weights included)."""


def core(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose sharded_state_dict is the checkpoint: inside megatron's DDP (or
    DeepSpeed's engine), around the GPTModel or its bf16 wrapper."""
    while not isinstance(model, GPTModel | Float16Module) and hasattr(model, "module"):
        model = model.module
    return model


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    dist_checkpointing.save(core(model).sharded_state_dict(), str(directory / "model"))


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    target = core(model)
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(),
                                                   str(directory / "model")))


def _optim_metadata(distributed: bool) -> dict:
    # Why dp_reshardable: megatron's default layout for distributed-optimizer state fails
    # here ("flattened_range is not supported"); this one reshards over DP sizes.
    return {"distrib_optim_sharding_type": "dp_reshardable"} if distributed else {}


class MegatronEngine:
    """megatron's DDP (gradients averaged over DP ranks) and its optimizer.

    With overlap, the pipeline schedules hold the reduction back while microbatches
    accumulate (no_sync), start it as each model chunk's backward ends, and let the forward
    pass gather the distributed optimizer's parameters (as Megatron-LM wires them)."""

    def __init__(self, model: torch.nn.Module, opt: OptConfig, layout: ParallelConfig,
                 fast: FastPath = OFF):
        self.distributed = layout.distributed_optimizer
        self.model = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.distributed,
            overlap_grad_reduce=fast.overlap_grad_reduce,
            overlap_param_gather=fast.overlap_param_gather), model)
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads  # the DP all-reduce
        if fast.overlap_grad_reduce:
            config.no_sync_func, config.grad_sync_func = (self.model.no_sync,
                                                          self.model.start_grad_sync)
        if fast.overlap_param_gather:
            config.param_sync_func = self.model.start_param_sync
        self.optimizer = build_optimizer(self.model, opt, self.distributed)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self, micros: list[schedule.Micro]) -> tuple[list[dict], float]:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = schedule.run(self.model, micros, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        return results, float(grad_norm)

    @contextmanager
    def synced(self) -> Iterator[None]:
        """With overlap_param_gather the optimizer's updated parameters reach the model in
        the next forward's pre-hooks: gather them now."""
        overlapped = self.model.ddp_config.overlap_param_gather
        if overlapped:
            self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlapped:
                self.model.enable_forward_pre_hook()

    def settings(self) -> dict:
        return {"engine": "megatron", "distributed_optimizer": self.distributed}

    def _optim_state(self, loading: bool = False) -> dict:
        return self.optimizer.sharded_state_dict(  # from its own copy: it builds in place
            core(self.model).sharded_state_dict(), is_loading=loading,
            metadata=_optim_metadata(self.distributed))

    def save(self, directory: Path) -> None:
        dist_checkpointing.save(self._optim_state(), str(directory / "optim"))
        save_weights(self.model, directory)

    def load(self, directory: Path) -> None:
        load_weights(self.model, directory)
        with torch.no_grad():  # dp_reshardable loading needs it
            self.optimizer.load_state_dict(dist_checkpointing.load(
                self._optim_state(loading=True), str(directory / "optim")))
