"""megatron-core's optimizer (AdamW; optionally sharded over DP) and the learning-rate
schedule (linear warmup, then constant or cosine)."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer

from forgetless.config import OptConfig

NO_CLIP = 1e30  # megatron reports the grad norm only when clipping: clip at "infinity"


def build_optimizer(model: torch.nn.Module, cfg: OptConfig,
                    distributed: bool = False) -> MegatronOptimizer:
    """AdamW over the model's trainable parameters; norms and biases without weight decay.

    `model` is megatron's DistributedDataParallel wrapper, whose grad buffers the optimizer
    reads."""
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2, adam_eps=cfg.eps, clip_grad=cfg.grad_clip or NO_CLIP,
        use_distributed_optimizer=distributed, bf16=cfg.precision == "bf16",
        params_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32), [model])


def lr_at(step: int, cfg: OptConfig, total_steps: int | None) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps:
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: MegatronOptimizer, lr: float) -> None:
    """Any optimizer or engine with param_groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
