"""LoRA: rank-r adapters beside the transformer's linear layers; base weights frozen.

Applied to every attention and MLP linear (qkv, output projection, fc1, fc2); embeddings and
the output layer stay frozen. `merge` folds the adapters back into plain linears for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = (("self_attention", "linear_qkv"), ("self_attention", "linear_proj"),
           ("mlp", "linear_fc1"), ("mlp", "linear_fc2"))


class LoRALinear(nn.Module):
    """Wraps a megatron linear (which returns (output, bias)): output + scale * B A x."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))  # starts as the identity
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, bias = self.base(x, *args, **kwargs)
        return out + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale, bias

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_b @ self.lora_a


def _layers(model: nn.Module):
    return model.decoder.layers


def apply(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze the model, add adapters, return the trainable adapter parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in _layers(model):
        for block, name in TARGETS:
            parent = getattr(layer, block)
            wrapped = LoRALinear(getattr(parent, name), rank, alpha)
            setattr(parent, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge(model: nn.Module) -> None:
    """Fold adapters into the base weights and remove them (the model's own layout again)."""
    for layer in _layers(model):
        for block, name in TARGETS:
            parent = getattr(layer, block)
            wrapped = getattr(parent, name)
            if isinstance(wrapped, LoRALinear):
                with torch.no_grad():
                    wrapped.base.weight.copy_(wrapped.merged_weight())
                setattr(parent, name, wrapped.base)
