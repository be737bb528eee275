"""DeepSpeed ZeRO as a training engine (engine=deepspeed): the same megatron-core model,
wrapped by DeepSpeed's engine instead of megatron's DDP and optimizer.

Stage 1 partitions the optimizer state over the data-parallel ranks, 2 the gradients too,
3 the parameters too; offload keeps the optimizer state (and under stage 3 the parameters) in
CPU memory. Under stage 3 the frozen teacher is partitioned the same way, as an engine without
an optimizer (as TRL prepares its reference model). The optimizer is torch's AdamW with
megatron's parameter groups, so both engines take the same steps, and nothing is JIT-compiled
(DeepSpeed's FusedAdam and CPUAdam would be).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import deepspeed
import torch

from forgetless import cpu_shims, engine, schedule
from forgetless.config import DeepSpeedConfig, OptConfig
from forgetless.errors import UserError

TAG = "state"  # one DeepSpeed checkpoint per forgetless checkpoint directory


class Wrapped(torch.nn.Module):
    """A DeepSpeed engine as megatron's schedules and forgetless's passes take a model: calls
    go through the engine (under ZeRO-3 it gathers each layer's parameters, and those a layer
    borrows, such as tied embeddings), `config` is the model's TransformerConfig."""

    def __init__(self, ds_engine: deepspeed.DeepSpeedEngine):
        super().__init__()
        self.module = ds_engine
        self.config = ds_engine.module.config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ds_config(cfg: DeepSpeedConfig, opt: OptConfig, trained: bool = True) -> dict:
    """DeepSpeed's configuration for the student (trained) or the frozen teacher."""
    zero = {"stage": cfg.stage,
            # partition every parameter, the small ones (norms, biases) included
            "stage3_param_persistence_threshold": 0}
    pin = torch.cuda.is_available()
    if cfg.offload_optimizer != "none" and trained:
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": pin}
    if cfg.offload_param != "none":
        zero["offload_param"] = {"device": cfg.offload_param, "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # the loop owns the step: a backward per microbatch, then one update
        "managed_gradient_accumulation": False,
        "gradient_clipping": opt.grad_clip,  # 0: none (DeepSpeed's default would be 1.0)
        "bf16": {"enabled": opt.precision == "bf16"},
        "zero_optimization": zero,
        # torch's AdamW on offloaded state: DeepSpeedCPUAdam would JIT-compile
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
    }


def adamw(model: torch.nn.Module, opt: OptConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in megatron's groups: no weight decay on biases
    and other 1-D parameters (norms)."""
    groups: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[not (name.endswith(".bias") or param.dim() == 1)].append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": opt.weight_decay if decay else 0.0}
         for decay, params in groups.items() if params],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)


def _initialize(model: torch.nn.Module, config: dict, optimizer=None):
    cpu_shims.install_deepspeed()
    # DeepSpeed insists on LOCAL_RANK, which torchrun sets; a plain one-process run is rank 0
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


class ZeroEngine:
    """The model, its AdamW and its gradients under DeepSpeed ZeRO."""

    def __init__(self, model: torch.nn.Module, opt: OptConfig, cfg: DeepSpeedConfig):
        self.stage = cfg.stage
        self.ds = _initialize(model, ds_config(cfg, opt), adamw(model, opt))
        self.model = Wrapped(self.ds)

    @property
    def param_groups(self) -> list[dict]:
        return self.ds.optimizer.param_groups

    def step(self, micros: list[schedule.Micro]) -> tuple[list[dict], float]:
        results = []
        for micro in micros:
            value, extras = micro.loss(schedule.forward(self.model, micro))
            self.ds.backward(value, scale_wrt_gas=False)  # value: this micro's share already
            results.append({"loss": value.detach(), **extras})
        self.ds.step()
        return results, float(self.ds.get_global_grad_norm())

    def synced(self) -> nullcontext:
        return nullcontext()  # DeepSpeed's step leaves the module's parameters current

    def settings(self) -> dict:
        return {"engine": "deepspeed", "deepspeed": {"stage": self.stage},
                "dp": self.ds.dp_world_size}

    @contextmanager
    def _whole(self):
        """Under stage 3 every parameter gathered on every rank (a save's peak: the whole
        model once per rank, as DeepSpeed's own 16-bit save gathers it)."""
        if self.stage < 3:
            yield
            return
        with deepspeed.zero.GatheredParameters(list(self.ds.module.parameters())):
            yield

    def save(self, directory: Path) -> None:
        with self._whole():
            engine.save_weights(self.model, directory)
        self.ds.save_checkpoint(str(directory / "deepspeed"), tag=TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        if not (directory / "deepspeed" / TAG).is_dir():
            raise UserError(f"checkpoint {directory}: deepspeed/{TAG} is missing (saved by "
                            f"another engine?)")
        path, _ = self.ds.load_checkpoint(str(directory / "deepspeed"), tag=TAG,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"checkpoint {directory}: DeepSpeed could not load deepspeed/{TAG}")


def frozen(model: torch.nn.Module, opt: OptConfig, cfg: DeepSpeedConfig) -> torch.nn.Module:
    """The frozen teacher: under stage 3 partitioned (and offloaded as the parameters are) in
    an engine without an optimizer; under stages 1 and 2, which leave parameters whole, the
    model itself."""
    if cfg.stage < 3:
        return model
    teacher = Wrapped(_initialize(model, ds_config(cfg, opt, trained=False)))
    teacher.eval()
    return teacher
