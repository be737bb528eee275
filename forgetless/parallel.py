"""Process groups: torch.distributed plus megatron-core's parallel_state.

A plain `forgetless ...` is a world of one; under torchrun the environment gives the world.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from forgetless import cpu_shims


def init(seed: int, threads: int = 0, tp: int = 1, pp: int = 1) -> None:
    """Process groups, CPU shims, seeds, and torch's intra-op threads (0: torch's default)."""
    cpu_shims.install()
    if threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    seed_all(seed)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    """Where the model and batches live: this rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: Any) -> Any:
    """A tensor, or a dict of tensors (None allowed), moved to device()."""
    if isinstance(batch, dict):
        return {k: to_device(v) for k, v in batch.items()}
    return batch if batch is None else batch.to(device(), non_blocking=True)


def single_process(program: str) -> None:
    """Training needs gradient synchronisation across ranks, which arrives with issue 4."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from forgetless.errors import UserError

        raise UserError(f"{program} runs on one process for now (world size "
                        f"{dist.get_world_size()}); multi-process training is issue #4")


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
