"""Process groups: torch.distributed plus megatron-core's parallel_state.

A plain `forgetless ...` is a world of one; under torchrun the environment gives the world.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from forgetless import cpu_shims, host_memory
from forgetless.errors import UserError


def init(seed: int, threads: int = 0, tp: int = 1, pp: int = 1) -> None:
    """Process groups, CPU shims, seeds, and torch's intra-op threads (0: torch's default)."""
    cpu_shims.install()
    if not torch.cuda.is_available():
        host_memory.keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        if parallel_state.model_parallel_is_initialized():  # groups of a destroyed world
            parallel_state.destroy_model_parallel()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise UserError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the world size "
                        f"{world}")
    if parallel_state.model_parallel_is_initialized():
        if (tp_size(), pp_size()) != (tp, pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    seed_all(seed)


def shutdown() -> None:
    """End the world init made (megatron's groups with it), so a later init starts afresh."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    """1 also before init: the losses work on plain tensors too."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def split_rows(batch: torch.Tensor | None) -> torch.Tensor | None:
    """This DP rank's contiguous share of a global batch's rows."""
    if batch is None:
        return None
    rows, world = batch.size(0), dp_size()
    if rows % world:
        raise UserError(f"a global batch of {rows} rows does not split over {world} "
                        f"data-parallel ranks")
    share = rows // world
    return batch[dp_rank() * share:(dp_rank() + 1) * share]


def from_main(digest: Callable[[], str]) -> str:
    """A hex digest computed on rank 0 alone (hashing files every rank would otherwise read),
    given to every rank."""
    if world_size() == 1:
        return digest()
    value = digest().encode() if is_main() else b""
    size = torch.tensor([len(value)], device=device())
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device())
    if is_main():
        buffer.copy_(torch.frombuffer(bytearray(value), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def from_last_stage(values: dict[str, float] | None) -> dict[str, float]:
    """Metrics computed on the last pipeline stage: summed over its DP ranks (a key missing
    on one counts 0), then given to every rank, so that all take the same decisions."""
    if dist.get_world_size() == 1:
        return values or {}
    if values is not None:
        shares: list[dict] = [{}] * dp_size()
        dist.all_gather_object(shares, values, group=parallel_state.get_data_parallel_group())
        values = {}
        for share in shares:
            for key, value in share.items():
                values[key] = values.get(key, 0.0) + value
    box = [values]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def vocab_group() -> dist.ProcessGroup | None:
    """The group whose ranks hold the vocabulary's slices; None when one rank holds it all."""
    return tp_group() if tp_size() > 1 else None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
