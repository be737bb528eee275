"""The one model definition: megatron-core's GPTModel, sized from config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from forgetless import cpu_shims
from forgetless.config import ModelConfig


def transformer_config(cfg: ModelConfig) -> TransformerConfig:
    swiglu = cfg.mlp == "swiglu"
    return TransformerConfig(
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.num_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        use_cpu_initialization=cpu_shims.on_cpu(),
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def build_model(cfg: ModelConfig) -> GPTModel:
    """GPTModel with pre-norm RMSNorm, RoPE, optional qk-norm, untied embeddings, no biases."""
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_norm, normalization="RMSNorm")
    if cpu_shims.on_cpu():
        spec.submodules.self_attention.submodules.core_attention = cpu_shims.SDPACoreAttention
    return GPTModel(
        config=transformer_config(cfg),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab,
        max_sequence_length=cfg.seq_len,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.rope_base,
    )


def count_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not (exclude_embeddings and "embedding" in n)
    )


def token_losses(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token losses [b, s-1] for packed sequences [b, s]."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.size(1), device=tokens.device).expand_as(inputs)
    return model(inputs, positions, attention_mask=None, labels=labels)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus attention scores (PaLM appendix B)."""
    attn = cfg.hidden * 3 * cfg.num_heads * cfg.head_dim + cfg.num_heads * cfg.head_dim * cfg.hidden
    mlp = cfg.hidden * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = cfg.layers * (attn + mlp) + cfg.hidden * cfg.vocab  # + output layer
    return 6 * matmul_params + 12 * cfg.layers * cfg.num_heads * cfg.head_dim * cfg.seq_len
