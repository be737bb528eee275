"""The one model definition: megatron-core's GPTModel, sized from config."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from forgetless import cpu_shims
from forgetless.config import ConfigError, ModelConfig


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
        pipeline_dtype=torch.float32,  # the dtype of activations sent between stages
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )


LOGITS = torch.empty(0)  # labels= value asking GPT for its logits as they are


class GPT(GPTModel):
    """megatron's GPTModel, which can also return its logits in its own [s, b, v / tp] layout.

    Why: with labels=None GPTModel returns a [b, s, v] copy of them; at full vocabulary that
    strided copy costs about as much as the KL computed over them (kl_pre makes two per step).
    """

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor
                                    ) -> torch.Tensor:
        if labels is LOGITS:
            return logits
        return super().compute_language_model_loss(labels, logits)


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Sizes the parallel layout cannot split are the user's error: named here, before
    megatron asserts on them (heads, vocab and MLP width split over TP ranks, layers over
    pipeline stages)."""
    for key, size, layout, ranks in (("model.heads", cfg.num_heads, "parallel.tp", tp),
                                     ("model.vocab", cfg.vocab, "parallel.tp", tp),
                                     ("model.ffn_hidden", cfg.ffn_size, "parallel.tp", tp),
                                     ("model.layers", cfg.layers, "parallel.pp", pp)):
        if size % ranks:
            raise ConfigError(f"{key}: {size} does not split over {layout}={ranks} "
                              f"(make it a multiple of {ranks}, or change {layout})")


def build_model(cfg: ModelConfig) -> GPT:
    """GPTModel with pre-norm RMSNorm, RoPE, optional qk-norm, untied embeddings, no biases."""
    check_layout(cfg, parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size())
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_norm, normalization="RMSNorm")
    if cpu_shims.on_cpu():
        spec.submodules.self_attention.submodules.core_attention = cpu_shims.SDPACoreAttention
    model = GPT(
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
    # megatron creates the linears on the GPU but leaves the norms on the CPU
    return model.to(torch.cuda.current_device()) if torch.cuda.is_available() else model


def with_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """bf16: megatron's Float16Module (bf16 weights and math, fp32 inputs and outputs)."""
    if precision == "fp32":
        return model
    model.config.bf16 = True
    model.config.params_dtype = model.config.pipeline_dtype = torch.bfloat16
    return Float16Module(model.config, model)


def sharded_tensors(sharded_state_dict: dict) -> list[ShardedTensor]:
    """The ShardedTensors of a megatron sharded state dict, factories (SwiGLU's fc1) built."""
    found = []
    for value in sharded_state_dict.values():
        if isinstance(value, dict):
            found += sharded_tensors(value)
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            found += sharded_tensors(built) if isinstance(built, dict) else list(built)
        elif isinstance(value, ShardedTensor):
            found.append(value)
    return found


@torch.no_grad()
def init_weights(model: GPTModel, cfg: ModelConfig, seed: int) -> None:
    """Draw every matrix whole from (seed, its checkpoint key), keep this rank's slice.

    Why: megatron initialises from the global RNG in module order, so each pipeline stage
    would start its layers from the same stream; keyed draws give every TP/PP layout the
    weights of the single-process model. Output projections get megatron's scaled std."""
    scaled = cfg.init_std / math.sqrt(2 * cfg.layers)
    for sh in sharded_tensors(model.sharded_state_dict()):
        if sh.data.dim() < 2:  # norm gains keep their ones
            continue
        std = scaled if sh.key.endswith(("linear_proj.weight", "linear_fc2.weight")) \
            else cfg.init_std
        # megatron stacks the layers on prepended axes: their offsets say which layer this is
        lead = sh.prepend_axis_num
        name = f"{sh.key}{list(sh.global_offset[:lead])}"
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(sh.global_shape[lead:], generator=generator).mul_(std)
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape,
                                                       strict=True))
        sh.data.copy_(full[index])


def count_params(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of the whole model (every TP shard and pipeline stage), from its config."""
    h, q = cfg.hidden, cfg.num_heads * cfg.head_dim
    attn = h * 3 * q + q * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    mlp = h * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    body = cfg.layers * (attn + mlp + 2 * h) + h  # two norms per layer, the final norm
    return body if exclude_embeddings else body + 2 * cfg.vocab * h  # input + output embedding


def next_token(model: torch.nn.Module, tokens: torch.Tensor, labels: bool = True
               ) -> torch.Tensor:
    """For packed sequences [b, s]: per-token next-token losses [b, s-1], or (labels=False)
    the logits in megatron's layout [s-1, b, vocab / tp]."""
    inputs = tokens[:, :-1]
    positions = torch.arange(inputs.size(1), device=tokens.device).expand_as(inputs)
    return model(inputs, positions, attention_mask=None,
                 labels=tokens[:, 1:] if labels else LOGITS)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus attention scores (PaLM appendix B)."""
    attn = cfg.hidden * 3 * cfg.num_heads * cfg.head_dim + cfg.num_heads * cfg.head_dim * cfg.hidden
    mlp = cfg.hidden * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = cfg.layers * (attn + mlp) + cfg.hidden * cfg.vocab  # + output layer
    return 6 * matmul_params + 12 * cfg.layers * cfg.num_heads * cfg.head_dim * cfg.seq_len
