"""Workarounds for megatron-core and DeepSpeed code that assumes CUDA, used only on CPU.

Every shim here exists because a library code path calls CUDA unconditionally (or builds a
CPU extension); on GPUs none of this is installed and the library's normal path runs.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" (and .cuda() / .to("cuda")) to the CPU.

    Why: megatron's DDP grad buffers, optimizer, pipeline schedules and dist_checkpointing
    create tensors with device="cuda" or torch.cuda.current_device() unconditionally."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


_tensor_type = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, *args, **kwargs):
    """Why: megatron's DDP and optimizer assert tensor.type() == "torch.cuda.FloatTensor".
    The mode above calls this again for its own dispatch, hence the guard against a second
    rewrite."""
    if args or kwargs:
        return _tensor_type(self, *args, **kwargs)
    name = _tensor_type(self)
    return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


_installed = False


def install() -> None:
    """Patch the torch.cuda calls megatron-core makes unconditionally; a no-op on GPUs."""
    global _installed
    if not on_cpu() or _installed:
        return
    _installed = True
    # Why: RoPE (rotary_pos_embedding.get_emb) and tensor-parallel layers place tensors on
    # device=torch.cuda.current_device(); "cpu" keeps them where the model is. A string, not 0,
    # because index 0 would mean cuda:0 for torch's device parsing (and the mode above is not
    # active inside autograd's backward).
    torch.cuda.current_device = lambda: "cpu"
    # Why: timers and schedules call synchronize between steps; there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.type = _cuda_type_name
    # Why: activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA
    # RNG state around each recomputed block; there is none (and no dropout to replay).
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0)
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    CudaToCpu().__enter__()


def install_deepspeed() -> None:
    """Why: on a CPU, DeepSpeed's first init_distributed JIT-compiles a shared-memory comm op
    (about 100 s with g++); gloo's collectives are what runs here anyway."""
    if on_cpu():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
