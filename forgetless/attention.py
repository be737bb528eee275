"""The model's core attention (megatron's layer spec takes it as a submodule)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention, on every device.

    Why: on CUDA, SDPA dispatches to the flash, cuDNN or memory-efficient kernels (megatron's
    local DotProductAttention materialises the [s, s] scores); on CPU, DotProductAttention
    cannot run at all (its score buffer comes from parallel_state.get_global_memory_buffer(),
    allocated on torch.cuda.current_device()). One core attention everywhere keeps the layer
    spec, checkpoints and the Hugging Face weight table the same on CPUs and GPUs.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **_: object):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention supports causal masks only, got {attn_mask_type}")
        self.scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None, attn_mask_type=None,
                **_: object) -> torch.Tensor:
        # megatron layout [s, b, heads, dim] -> SDPA layout [b, heads, s, dim]
        # (whole causal sequences only: decoding has its own attention, forgetless/decode.py)
        # (grouped-query attention: key and value carry one head per group, as megatron's own
        # core attention receives them)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=k.size(1) != q.size(1))
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
