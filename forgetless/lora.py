"""LoRA: rank-r adapters on the transformer's linear layers; base weights frozen.

Applied to every attention and MLP linear (qkv, output projection, fc1, fc2); embeddings and
the output layer stay frozen. The adapters live on the megatron linears themselves (`lora_a`,
`lora_b` beside `weight`), so the base weights keep their checkpoint keys. Tensor-parallel:
on a column-parallel linear A is whole and B split by output rows; on a row-parallel one A is
split by input columns and B whole, with the same reductions megatron's linears use.
`merge` folds the adapters into the weights for export.
"""

from __future__ import annotations

import math
import types

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from forgetless import parallel

# (block, linear, column-parallel)
TARGETS = (("self_attention", "linear_qkv", True), ("self_attention", "linear_proj", False),
           ("mlp", "linear_fc1", True), ("mlp", "linear_fc2", False))


def _forward_hook(linear: nn.Module, args: tuple, output: tuple) -> tuple:
    out, bias = output
    h = args[0] @ linear.lora_a.t()
    h = (copy_to_tensor_model_parallel_region(h) if linear.lora_column
         else reduce_from_tensor_model_parallel_region(h))
    return out + (h @ linear.lora_b.t()) * linear.lora_scale, bias


def _sharded_state_dict(linear: nn.Module, prefix: str = "", sharded_offsets: tuple = (),
                        metadata: dict | None = None) -> dict:
    """The linear's own entries plus the adapters, each split along its TP axis."""
    sd = type(linear).sharded_state_dict(linear, prefix, sharded_offsets, metadata)
    split = {"lora_b": 0} if linear.lora_column else {"lora_a": 1}
    sd.update(make_sharded_tensors_for_checkpoint(
        {"lora_a": linear.lora_a, "lora_b": linear.lora_b}, prefix, split, sharded_offsets))
    if linear.lora_glu:  # fc1's rows are [gate; up], each split over TP like the weight's
        sd[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(sd[f"{prefix}lora_b"],
                                                             sharded_offsets)
    return sd


def _targets(model: nn.Module):
    for layer in model.decoder.layers:
        for block, name, column in TARGETS:
            yield getattr(getattr(layer, block), name), column, name


def apply(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze the model, add adapters (B = 0: the model is unchanged), return them."""
    model.requires_grad_(False)
    tp, tp_rank = parallel.tp_size(), parallel.tp_rank()
    glu = model.config.gated_linear_unit
    params = []
    for linear, column, name in _targets(model):
        out_local, in_local = linear.weight.shape
        a = torch.empty(rank, in_local * (1 if column else tp))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # drawn whole: the same under any TP
        if not column:
            a = a[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        linear.lora_a = nn.Parameter(a.to(linear.weight.device).contiguous())
        linear.lora_b = nn.Parameter(torch.zeros(out_local, rank, device=linear.weight.device))
        linear.lora_scale, linear.lora_column = alpha / rank, column
        linear.lora_glu = glu and name == "linear_fc1"
        # the TP-split factor is marked so that the gradient norm counts every rank's slice
        split = linear.lora_b if column else linear.lora_a
        set_tensor_model_parallel_attributes(split, True, 0 if column else 1,
                                             2 if linear.lora_glu else 1)
        linear.lora_hook = linear.register_forward_hook(_forward_hook)
        linear.sharded_state_dict = types.MethodType(_sharded_state_dict, linear)
        params += [linear.lora_a, linear.lora_b]
    return params


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold adapters into the base weights and remove them (the model's own layout again)."""
    for linear, _, _ in _targets(model):
        if hasattr(linear, "lora_hook"):
            linear.weight.add_(linear.lora_scale * linear.lora_b @ linear.lora_a)
            linear.lora_hook.remove()
            for attr in ("lora_a", "lora_b", "lora_hook", "lora_scale", "lora_column",
                         "lora_glu", "sharded_state_dict"):
                delattr(linear, attr)
