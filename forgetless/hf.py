"""Hugging Face models in and out: one declarative weight table, read per rank, written whole.

`WEIGHTS` maps each megatron parameter to the Hugging Face tensors it is made of and to how
tensor parallelism splits it; the same table drives import (`load_weights`: each rank reads only
its slices through safetensors' `get_slice`, so no rank holds the whole model) and export
(`hf_state_dict`: the one-process model split back into Hugging Face names). The families
differ only in which parameters exist (QKV biases for Qwen2, q/k norms for Qwen3), so one table
serves them all; `ARCHITECTURES` says which class a config is and what it has.

Megatron's fused layouts, which the tests check against `transformers` rather than assume:
linear_qkv rows are per query group [q heads of the group; its key; its value], and a TP rank
holds whole groups; SwiGLU's linear_fc1 rows are [gate; up] of the rank's slice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from forgetless.config import ModelConfig
from forgetless.errors import UserError

MAX_SEQ_LEN = 2048  # an imported model trains at min(its max_position_embeddings, this)
INDEX = "model.safetensors.index.json"


class HFError(UserError):
    """A Hugging Face model directory this code cannot read or a model it cannot write; the
    message names the file or key."""


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    qkv_bias: bool
    qk_norm: bool


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "mistral": Architecture("MistralForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": Architecture("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": Architecture("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
}
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}

# megatron parameter -> (Hugging Face tensors, how TP splits it). "{i}" is the global layer.
# replicated: whole on every rank; row: input columns split; vocab: rows split (padding rows
# zero); qkv: whole query groups per rank, fused per group; gate_up: [gate; up] of the rows.
LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."
WEIGHTS: dict[str, tuple[tuple[str, ...], str]] = {
    "embedding.word_embeddings.weight": (("model.embed_tokens.weight",), "vocab"),
    LAYER + "input_layernorm.weight": ((HF_LAYER + "input_layernorm.weight",), "replicated"),
    LAYER + "self_attention.linear_qkv.weight": (
        tuple(HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    LAYER + "self_attention.linear_qkv.bias": (
        tuple(HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    LAYER + "self_attention.q_layernorm.weight": ((HF_LAYER + "self_attn.q_norm.weight",),
                                                  "replicated"),
    LAYER + "self_attention.k_layernorm.weight": ((HF_LAYER + "self_attn.k_norm.weight",),
                                                  "replicated"),
    LAYER + "self_attention.linear_proj.weight": ((HF_LAYER + "self_attn.o_proj.weight",), "row"),
    LAYER + "pre_mlp_layernorm.weight": ((HF_LAYER + "post_attention_layernorm.weight",),
                                         "replicated"),
    LAYER + "mlp.linear_fc1.weight": ((HF_LAYER + "mlp.gate_proj.weight",
                                       HF_LAYER + "mlp.up_proj.weight"), "gate_up"),
    LAYER + "mlp.linear_fc2.weight": ((HF_LAYER + "mlp.down_proj.weight",), "row"),
    "decoder.final_layernorm.weight": (("model.norm.weight",), "replicated"),
    "output_layer.weight": (("lm_head.weight",), "vocab"),
}
TIED_OUTPUT = ("model.embed_tokens.weight",)  # the last stage's copy of tied embeddings


def is_hf_model(path: str | Path) -> bool:
    """A directory with config.json and safetensors weights (a forgetless checkpoint has
    state.json and model/ instead)."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / "state.json").exists()
            and any(path.glob("*.safetensors")))


# ---- import -------------------------------------------------------------------------------

def _read_config(path: Path) -> dict:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{file}: cannot be read ({e})") from e


def _rope(raw: dict, file: Path) -> tuple[float, float]:
    """(RoPE base, Llama-3 scaling factor or 0) from transformers 5's rope_parameters or the
    older rope_theta / rope_scaling fields."""
    rope = raw.get("rope_parameters") or {**(raw.get("rope_scaling") or {}),
                                          "rope_theta": raw.get("rope_theta", 10000.0)}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(rope["rope_theta"]), 0.0
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(rope.get(k, v) != v for k, v in fixed.items()):
        raise HFError(f"{file}: RoPE {rope} is not supported (default, or llama3 with "
                      f"{fixed}, as megatron-core implements it)")
    return float(rope["rope_theta"]), float(rope["factor"])


def _refuse(file: Path, raw: dict, arch: Architecture) -> None:
    """Settings these families allow that the megatron model does not implement."""
    bad = []
    if raw.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={raw['hidden_act']!r} (only silu)")
    if raw.get("mlp_bias"):
        bad.append("mlp_bias=true")
    if raw.get("attention_bias") and not arch.qkv_bias:
        bad.append("attention_bias=true (an output-projection bias)")
    if raw.get("use_sliding_window") or (raw.get("model_type") == "mistral"
                                         and raw.get("sliding_window") is not None
                                         and raw["sliding_window"] < _seq_len(raw)):
        bad.append(f"sliding-window attention (sliding_window={raw.get('sliding_window')})")
    if bad:
        raise HFError(f"{file}: not supported: {'; '.join(bad)}")


def _seq_len(raw: dict) -> int:
    return min(int(raw.get("max_position_embeddings", MAX_SEQ_LEN)), MAX_SEQ_LEN)


def model_config(path: str | Path) -> ModelConfig:
    """The forgetless architecture of a Hugging Face model directory."""
    path = Path(path)
    file = path / "config.json"
    raw = _read_config(path)
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFError(f"{file}: model_type {kind!r} is not supported "
                      f"(supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[kind]
    _refuse(file, raw, arch)
    rope_base, scaling = _rope(raw, file)
    try:
        heads = int(raw["num_attention_heads"])
        return ModelConfig(
            hidden=int(raw["hidden_size"]), layers=int(raw["num_hidden_layers"]),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads), heads=heads,
            query_groups=int(raw.get("num_key_value_heads") or heads),
            ffn_hidden=int(raw["intermediate_size"]), seq_len=_seq_len(raw),
            vocab=int(raw["vocab_size"]), mlp="swiglu", qk_norm=arch.qk_norm,
            rope_base=rope_base, rope_scaling_factor=scaling, qkv_bias=arch.qkv_bias,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_positions=int(raw.get("max_position_embeddings", 0)))
    except KeyError as e:
        raise HFError(f"{file}: field {e.args[0]} is missing") from e


class Reader:
    """Tensors of a model directory by name, through the index when the weights are sharded;
    files are opened once and read by slice."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX
        if index.exists():
            self.files = {k: path / v for k, v in json.loads(index.read_text())["weight_map"]
                          .items()}
        else:
            self.files = {}
            for file in sorted(path.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        self.open: dict[Path, object] = {}

    def slice(self, name: str):
        """A lazy view of tensor `name`; index it ([rows], [:, cols]) to read."""
        if name not in self.files:
            raise HFError(f"{self.path}: the weights have no tensor {name}")
        file = self.files[name]
        if file not in self.open:
            if not file.exists():
                raise HFError(f"{file}: missing (named in {INDEX} for {name})")
            self.open[file] = safe_open(file, framework="pt")
        return self.open[file].get_slice(name)

    def close(self) -> None:
        self.open.clear()


def _shard(reader: Reader, names: tuple[str, ...], kind: str, cfg: ModelConfig, rank: int,
           tp: int) -> torch.Tensor:
    """This TP rank's part of a megatron parameter, read from its Hugging Face tensors."""
    if kind == "replicated":
        return reader.slice(names[0])[:]
    if kind == "row":
        cols = reader.slice(names[0]).get_shape()[1] // tp
        return reader.slice(names[0])[:, rank * cols:(rank + 1) * cols]
    if kind == "vocab":
        rows = cfg.padded_vocab // tp
        first, stored = rank * rows, reader.slice(names[0])
        have = max(0, min(stored.get_shape()[0], first + rows) - first)
        part = stored[first:first + have]
        return torch.cat([part, part.new_zeros(rows - have, *part.shape[1:])])
    if kind == "gate_up":
        rows = cfg.ffn_size // tp
        return torch.cat([reader.slice(n)[rank * rows:(rank + 1) * rows] for n in names])
    groups, d = cfg.num_query_groups // tp, cfg.head_dim  # qkv
    per_group = cfg.num_heads // cfg.num_query_groups * d
    q, k, v = (reader.slice(n) for n in names)
    parts = []
    for g in range(rank * groups, (rank + 1) * groups):
        parts += [q[g * per_group:(g + 1) * per_group], k[g * d:(g + 1) * d],
                  v[g * d:(g + 1) * d]]
    return torch.cat(parts)


def _entry(name: str, layer_of: dict[int, int], tied_output: bool
           ) -> tuple[tuple[str, ...], str]:
    """The WEIGHTS entry of a model parameter, with its layer's global number filled in."""
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    key = LAYER + match.group(2) if match else name
    if key not in WEIGHTS:
        raise HFError(f"parameter {name} has no Hugging Face counterpart")
    names, kind = WEIGHTS[key]
    if key == "output_layer.weight" and tied_output:
        names = TIED_OUTPUT
    i = layer_of[int(match.group(1))] if match else 0
    return tuple(n.format(i=i) for n in names), kind


def _layer_numbers(model: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer number (pipeline stages hold a range)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Fill `model` (this rank's TP slice and PP stage) from a Hugging Face model directory."""
    path = Path(path)
    cfg, reader = model_config(path), Reader(path)
    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    layers, tied = _layer_numbers(model), model.share_embeddings_and_output_weights
    try:
        for name, param in model.named_parameters():
            names, kind = _entry(name, layers, tied)
            value = _shard(reader, names, kind, cfg, rank, tp)
            if value.shape != param.shape:
                raise HFError(f"{path}: {', '.join(names)} give shape {tuple(value.shape)} for "
                              f"{name}, which is {tuple(param.shape)} on this rank")
            param.copy_(value)
    finally:
        reader.close()


# ---- export -------------------------------------------------------------------------------

def _split(kind: str, value: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """A whole (TP=1) megatron parameter as its Hugging Face tensors: `_shard`'s inverse."""
    if kind == "vocab":
        return (value[:cfg.vocab],)
    if kind == "gate_up":
        return tuple(value.chunk(2))
    if kind == "qkv":
        d, groups = cfg.head_dim, cfg.num_query_groups
        per_group = cfg.num_heads // groups * d
        grouped = value.view(groups, per_group + 2 * d, *value.shape[1:])
        q, k, v = grouped.split([per_group, d, d], dim=1)
        return tuple(t.reshape(-1, *value.shape[1:]) for t in (q, k, v))
    return (value,)


def hf_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of a one-process model (padded vocabulary rows dropped)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1 or not (
            parallel_state.is_pipeline_first_stage() and parallel_state.is_pipeline_last_stage()):
        raise HFError("export needs the whole model in one process (TP=1, PP=1)")
    layers, out = _layer_numbers(model), {}
    for name, param in model.named_parameters():
        names, kind = _entry(name, layers, tied_output=False)
        out.update(zip(names, _split(kind, param.detach(), cfg), strict=True))
    return out


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, dtype: str) -> PretrainedConfig:
    """The transformers config of a forgetless architecture: Llama, Qwen2 with QKV biases,
    Qwen3 with qk-norm; what no class matches is refused."""
    if cfg.mlp != "swiglu":
        raise HFError(f"model.mlp={cfg.mlp!r}: no Hugging Face class of these families has a "
                      f"non-gated MLP; only swiglu models export")
    if cfg.qk_norm and cfg.qkv_bias:
        raise HFError("model.qk_norm with model.qkv_bias: no Hugging Face class has both")
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling_factor:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    extra = {} if kind == "llama" else {"use_sliding_window": False}
    return CONFIG_CLASSES[kind](
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_positions or cfg.seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, attention_bias=False,
        bos_token_id=bos_id, eos_token_id=eos_id, architectures=[ARCHITECTURES[kind].hf_class],
        dtype=dtype, **extra)


def save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> list[str]:
    """safetensors files of at most max_shard_size each (with their index when several);
    returns the file names."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, out / file,
                  metadata={"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX)
    return files
