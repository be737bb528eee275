"""The GPU fast path: which of megatron's fusions, overlaps, sequence parallelism and
activation recomputation a training run uses.

Each is a `parallel.` key; "auto" turns it on where it applies (CUDA, and the layout or
library it needs), "on" insists (an error names what is missing), "off" declines. Attention is
torch's scaled_dot_product_attention on every device (forgetless/attention.py): on CUDA it
dispatches to the flash / cuDNN / memory-efficient kernels, and one layer spec everywhere keeps
checkpoints and the Hugging Face weight table the same on CPUs and GPUs. The CPU path (nothing
fused or overlapped) is the one CI runs; recomputation works on both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from forgetless.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class FastPath:
    """Resolved switches (the defaults: the CPU path, also what inference models use)."""

    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute: str = "none"
    fusions: bool = False

    @property
    def rope_fusion(self) -> bool:
        """megatron's fused RoPE is Transformer Engine's kernel."""
        return self.fusions and has_transformer_engine()


OFF = FastPath()


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _switch(cfg: ParallelConfig, key: str, missing: list[str]) -> bool:
    """auto: on when nothing is missing; on: an error naming what is; off: off."""
    value = getattr(cfg, key)
    if value == "on" and missing:
        raise ConfigError(f"parallel.{key}: on, but it needs {'; '.join(missing)}")
    return value != "off" and not missing


def resolve(cfg: ParallelConfig, seq_len: int, dp: int) -> FastPath:
    """The switches of a training run on this machine."""
    cuda = ["CUDA GPUs"] if not torch.cuda.is_available() else []
    grad = _switch(cfg, "overlap_grad_reduce",
                   cuda + (["more than one data-parallel rank"] if dp == 1 else []))
    return FastPath(
        sequence_parallel=_switch(cfg, "sequence_parallel", cuda + [
            need for need, ok in (("parallel.tp > 1", cfg.tp > 1),
                                  ("transformer_engine (its norms; megatron's torch norm "
                                   "rejects sequence parallelism)", has_transformer_engine()),
                                  (f"model.seq_len a multiple of parallel.tp={cfg.tp}",
                                   seq_len % cfg.tp == 0)) if not ok]),
        overlap_grad_reduce=grad,
        overlap_param_gather=_switch(cfg, "overlap_param_gather", cuda + [
            need for need, ok in (("parallel.distributed_optimizer=true",
                                   cfg.distributed_optimizer),
                                  ("parallel.overlap_grad_reduce", grad)) if not ok]),
        recompute=cfg.recompute,
        fusions=_switch(cfg, "fusions", cuda),
    )
