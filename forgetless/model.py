"""The one model definition: megatron-core's GPTModel, sized from config."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from forgetless import cpu_shims
from forgetless.attention import SDPACoreAttention
from forgetless.config import ConfigError, ModelConfig
from forgetless.fast_path import OFF, FastPath
from forgetless.kernels.philox import normal_slice_


def transformer_config(cfg: ModelConfig, fast: FastPath = OFF, initialise: bool = True
                       ) -> TransformerConfig:
    swiglu = cfg.mlp == "swiglu"
    full = fast.recompute == "full"
    return TransformerConfig(
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        perform_initialization=initialise,
        use_cpu_initialization=cpu_shims.on_cpu(),
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        bias_activation_fusion=fast.fusions and swiglu,  # megatron fuses SwiGLU, not GELU
        apply_rope_fusion=fast.rope_fusion,
        masked_softmax_fusion=False,  # SDPA computes the softmax
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=fast.sequence_parallel,
        recompute_granularity=None if fast.recompute == "none" else fast.recompute,
        recompute_method="uniform" if full else None,
        recompute_num_layers=1 if full else None,
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
    megatron asserts on them (heads, key/value groups, padded vocab and MLP width split over
    TP ranks, layers over pipeline stages)."""
    for key, size, layout, ranks in (("model.heads", cfg.num_heads, "parallel.tp", tp),
                                     ("model.query_groups", cfg.num_query_groups,
                                      "parallel.tp", tp),
                                     ("model.vocab", cfg.padded_vocab, "parallel.tp", tp),
                                     ("model.ffn_hidden", cfg.ffn_size, "parallel.tp", tp),
                                     ("model.layers", cfg.layers, "parallel.pp", pp)):
        if size % ranks:
            hint = " or set model.vocab_multiple" if key == "model.vocab" else ""
            raise ConfigError(f"{key}: {size} does not split over {layout}={ranks} "
                              f"(make it a multiple of {ranks}{hint}, or change {layout})")


def build_model(cfg: ModelConfig, fast: FastPath = OFF, initialise: bool = True) -> GPT:
    """GPTModel with pre-norm RMSNorm and RoPE; grouped-query attention, qk-norm, QKV biases,
    tied embeddings and Llama-3 RoPE scaling as the config says; no other biases. `fast`:
    the training run's GPU switches (the default, all off, is what inference uses).

    initialise=False leaves the weights unset, for a caller that sets them at once
    (init_weights, a checkpoint): megatron's CPU initialisation draws every full matrix on
    every rank before keeping its slice."""
    check_layout(cfg, parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size())
    config = transformer_config(cfg, fast, initialise)
    model = GPT(
        config=config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_layer_spec=layer_spec(cfg, config),
        vocab_size=cfg.padded_vocab,
        max_sequence_length=cfg.seq_len,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_base,
        rope_scaling=cfg.rope_scaling_factor > 0,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
    )
    if not initialise:
        mark_tensor_parallel(model)
    # megatron creates the linears on the GPU but leaves the norms on the CPU
    return model.to(torch.cuda.current_device()) if torch.cuda.is_available() else model


SPLIT_AXIS = ((VocabParallelEmbedding, 0), (ColumnParallelLinear, 0), (RowParallelLinear, 1))


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Mark each TP-split weight as such, as megatron does only while it initialises them.

    Why: megatron's gradient norm counts an unmarked parameter once, on TP rank 0, as a copy
    of the others; unmarked, the norm (and so clipping) under TP would miss the other ranks'
    slices."""
    for name, module in model.named_modules():
        axis = next((a for kind, a in SPLIT_AXIS if isinstance(module, kind)), None)
        weight = getattr(module, "weight", None)
        if axis is None or weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        glu = name.endswith("linear_fc1") and model.config.gated_linear_unit
        set_tensor_model_parallel_attributes(weight, True, axis, 2 if glu else 1)


def layer_spec(cfg: ModelConfig, config: TransformerConfig
               ) -> ModuleSpec | TransformerBlockSubmodules:
    """megatron's local layer spec with SDPA core attention; under sequence parallelism,
    Transformer Engine's norms (same parameter names), which mark their weights for the TP
    gradient reduction that megatron's torch norm does not support."""
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if not config.sequence_parallel:
        return spec
    from megatron.core.extensions.transformer_engine import TENorm

    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TENorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=TENorm)


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
    """Draw this rank's slice of every matrix from (seed, its checkpoint key), in place.

    Why: megatron initialises from the global RNG in module order, so each pipeline stage
    would start its layers from the same stream; counter-based draws keyed on the parameter
    and each element's global index give every TP/PP layout the weights of the
    single-process model, and no rank ever holds a whole matrix. Output projections get
    megatron's scaled std."""
    scaled = cfg.init_std / math.sqrt(2 * cfg.layers)
    for sh in sharded_tensors(model.sharded_state_dict()):
        if sh.data.dim() < 2:  # biases start at zero, norm gains keep their ones
            if sh.key.endswith(".bias"):
                sh.data.zero_()
            continue
        std = scaled if sh.key.endswith(("linear_proj.weight", "linear_fc2.weight")) \
            else cfg.init_std
        # megatron stacks the layers on prepended axes: their offsets say which layer this is
        lead = sh.prepend_axis_num
        name = f"{sh.key}{list(sh.global_offset[:lead])}"
        normal_slice_(sh.data, seed, name, sh.global_shape[lead:], sh.global_offset[lead:])
        sh.data.mul_(std)


def count_params(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of the whole model (every TP shard and pipeline stage), from its config."""
    h, qkv = cfg.hidden, _qkv_width(cfg)
    attn = h * qkv + cfg.num_heads * cfg.head_dim * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    attn += qkv if cfg.qkv_bias else 0
    mlp = h * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    body = cfg.layers * (attn + mlp + 2 * h) + h  # two norms per layer, the final norm
    embeddings = (1 if cfg.tie_embeddings else 2) * cfg.padded_vocab * h
    return body if exclude_embeddings else body + embeddings


def _qkv_width(cfg: ModelConfig) -> int:
    """Output width of the fused QKV projection: all query heads, one key and value per group."""
    return (cfg.num_heads + 2 * cfg.num_query_groups) * cfg.head_dim


def next_token(model: torch.nn.Module, tokens: torch.Tensor, labels: bool = True
               ) -> torch.Tensor:
    """For packed sequences [b, s]: per-token next-token losses [b, s-1], or (labels=False)
    the logits in megatron's layout [s-1, b, vocab / tp].

    Under sequence parallelism the model sees all s tokens (s splits over the TP ranks, s - 1
    seldom does) and the last position's output, which has no label, is dropped: causal
    attention keeps it out of the others."""
    whole = getattr(model, "config", None) is not None and model.config.sequence_parallel
    inputs = tokens if whole else tokens[:, :-1]
    positions = torch.arange(inputs.size(1), device=tokens.device).expand_as(inputs)
    target = tokens[:, 1:]
    if whole and labels:
        target = torch.cat([target, target[:, -1:]], dim=1)  # a label for the dropped position
    out = model(inputs, positions, attention_mask=None, labels=target if labels else LOGITS)
    if not whole:
        return out
    return out[:, :-1] if labels else out[:-1]


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus attention scores (PaLM appendix B)."""
    attn = cfg.hidden * _qkv_width(cfg) + cfg.num_heads * cfg.head_dim * cfg.hidden
    mlp = cfg.hidden * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = cfg.layers * (attn + mlp) + cfg.hidden * cfg.padded_vocab  # + output layer
    return 6 * matmul_params + 12 * cfg.layers * cfg.num_heads * cfg.head_dim * cfg.seq_len
