"""One typed config schema: dataclass defaults, overridden by a YAML recipe, then key=value.

Unknown keys and invalid values raise ConfigError naming the key; so does a setting that
would do nothing in the run it is given to. Every key has one line of help (`HELP` beside
each schema class), shown by `forgetless <program> --help`.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from forgetless.errors import UserError

# the YAML presets ship as package data of forgetless.recipes (found in a wheel install too)
RECIPES_DIR = Path(str(importlib.resources.files("forgetless.recipes")))

T = TypeVar("T")


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """The GPT's sizes and architecture."""

    hidden: int = 128
    layers: int = 4
    head_dim: int = 32
    heads: int = 0
    ffn_hidden: int = 0
    seq_len: int = 128
    vocab: int = 4096
    mlp: str = "swiglu"
    qk_norm: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    query_groups: int = 0
    tie_embeddings: bool = False
    rope_scaling_factor: float = 0.0
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    vocab_multiple: int = 1
    max_positions: int = 0

    HELP: ClassVar[dict[str, str]] = {
        "hidden": "width of the residual stream",
        "layers": "transformer layers",
        "head_dim": "size of each attention head",
        "heads": "attention heads; 0: hidden / head_dim",
        "ffn_hidden": "MLP width; 0: 8/3 x hidden rounded up to 64 (swiglu) or 4 x hidden (gelu)",
        "seq_len": "tokens per training sequence",
        "vocab": "vocabulary size (of the tokenizer trained for the data)",
        "mlp": "MLP: swiglu or gelu",
        "qk_norm": "RMSNorm on queries and keys",
        "rope_base": "RoPE frequency base",
        "init_std": "standard deviation of the initial weights",
        "query_groups": "key/value heads (grouped-query attention); 0: one per attention head",
        "tie_embeddings": "the output layer shares the input embedding's weights",
        "rope_scaling_factor": "Llama-3 RoPE scaling factor (low 1, high 4, original 8192); "
                               "0: no scaling",
        "qkv_bias": "biases on the query, key and value projections (Qwen2)",
        "norm_eps": "RMSNorm epsilon",
        "vocab_multiple": "pad the embedding rows to a multiple of this (for TP); padded rows "
                          "are trimmed on export",
        "max_positions": "positions the model is meant for (exported as "
                         "max_position_embeddings); 0: seq_len",
    }

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "head_dim", "seq_len", "vocab"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _check(self.seq_len >= 2, "model.seq_len", "must be at least 2")
        _one_of(self.mlp, "model.mlp", ("swiglu", "gelu"))
        _check(self.heads >= 0, "model.heads", "must be >= 0")
        _check(self.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0")
        _check(self.heads or self.hidden % self.head_dim == 0, "model.head_dim",
               "must divide model.hidden (or set model.heads)")
        _check(self.query_groups >= 0, "model.query_groups", "must be >= 0")
        _check(not self.query_groups or self.num_heads % self.query_groups == 0,
               "model.query_groups", f"must divide the attention heads ({self.num_heads})")
        _check(self.rope_scaling_factor == 0 or self.rope_scaling_factor >= 1,
               "model.rope_scaling_factor", "must be 0 (off) or >= 1")
        _check(self.norm_eps > 0, "model.norm_eps", "must be positive")
        _check(self.vocab_multiple >= 1, "model.vocab_multiple", "must be >= 1")
        _check(self.max_positions >= 0, "model.max_positions", "must be >= 0")

    # Derived sizes are properties, not rewritten fields: defaults are validated before
    # overrides apply, so a value derived then would be stale.
    @property
    def num_heads(self) -> int:
        return self.heads or self.hidden // self.head_dim

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-8 * self.hidden // 3 // 64) * 64 if self.mlp == "swiglu" else 4 * self.hidden

    @property
    def num_query_groups(self) -> int:
        return self.query_groups or self.num_heads

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and output layer: vocab rounded up to vocab_multiple."""
        return -(-self.vocab // self.vocab_multiple) * self.vocab_multiple

    def resolved(self) -> dict:
        """Every architecture-defining value, derived ones filled in."""
        return {**asdict(self), "heads": self.num_heads, "ffn_hidden": self.ffn_size,
                "query_groups": self.num_query_groups,
                "max_positions": self.max_positions or self.seq_len}


@dataclass
class OptConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 50
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32
    precision: str = "fp32"

    HELP: ClassVar[dict[str, str]] = {
        "lr": "peak learning rate",
        "min_lr_ratio": "cosine: the final learning rate as a fraction of lr",
        "schedule": "after warmup: constant or cosine",
        "warmup_steps": "steps of linear warmup",
        "beta1": "AdamW beta1",
        "beta2": "AdamW beta2",
        "eps": "AdamW epsilon",
        "weight_decay": "AdamW weight decay",
        "grad_clip": "clip the gradient norm to this; 0: no clipping",
        "batch_size": "sequences per step, over all ranks",
        "precision": "fp32, or bf16 (bf16 weights and math, fp32 master weights)",
    }

    def __post_init__(self) -> None:
        _one_of(self.precision, "opt.precision", ("fp32", "bf16"))
        _check(self.lr > 0, "opt.lr", "must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "opt.min_lr_ratio", "must be in [0, 1]")
        _one_of(self.schedule, "opt.schedule", ("constant", "cosine"))
        _check(self.warmup_steps >= 0, "opt.warmup_steps", "must be >= 0")
        _check(0 <= self.beta1 < 1, "opt.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "opt.beta2", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "opt.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "opt.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.batch_size > 0, "opt.batch_size", "must be positive")


STOP_KEYS = ("tokens", "tokens_per_param", "epochs", "valid_loss", "steps", "patience")


@dataclass
class StopConfig:
    """Training stops at the first condition reached; with none set, at the program's
    default token budget (which thus never cuts short a condition the user set)."""

    tokens: int | None = None
    tokens_per_param: float | None = None
    epochs: float | None = None
    valid_loss: float | None = None
    steps: int | None = None
    patience: int | None = None

    HELP: ClassVar[dict[str, str]] = {
        "tokens": "training tokens (finetune: downstream tokens)",
        "tokens_per_param": "training tokens per non-embedding parameter (pretrain only)",
        "epochs": "passes over the training data",
        "valid_loss": "stop once valid_ntp is at most this (checked at each evaluation)",
        "steps": "optimizer steps",
        "patience": "early stopping: evaluations without a better valid_ntp",
    }

    def __post_init__(self) -> None:
        for key in STOP_KEYS:
            value = getattr(self, key)
            _check(value is None or value > 0, f"stop.{key}", "must be positive")

    def or_budget(self, tokens: int) -> StopConfig:
        """This, or when it sets no condition, a budget of `tokens` training tokens."""
        if any(getattr(self, key) is not None for key in STOP_KEYS):
            return self
        return StopConfig(tokens=tokens)


@dataclass
class EvalConfig:
    """Validation and logging."""

    interval: int = 100
    max_sequences: int = 512
    log_interval: int = 10
    peak_tflops: float = 0.0

    HELP: ClassVar[dict[str, str]] = {
        "interval": "steps between evaluations",
        "max_sequences": "validation sequences per evaluation; 0: all",
        "log_interval": "steps between training-loss log records",
        "peak_tflops": "peak TFLOP/s of one rank, to report model FLOPs utilisation; 0: off",
    }

    def __post_init__(self) -> None:
        _check(self.peak_tflops >= 0, "eval.peak_tflops", "must be >= 0")
        _check(self.interval > 0, "eval.interval", "must be positive")
        _check(self.max_sequences >= 0, "eval.max_sequences", "must be >= 0")
        _check(self.log_interval > 0, "eval.log_interval", "must be positive")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    interval: int = 0
    keep: int = 2

    HELP: ClassVar[dict[str, str]] = {
        "interval": "steps between checkpoints; 0: only at the end",
        "keep": "the newest checkpoints to keep",
    }

    def __post_init__(self) -> None:
        _check(self.interval >= 0, "ckpt.interval", "must be >= 0")
        _check(self.keep >= 1, "ckpt.keep", "must be >= 1")


@dataclass
class DataConfig:
    """How a corpus becomes token shards (used when `data=` names a source to prepare)."""

    tokenizer: str = "builtin"
    text_field: str = "text"
    valid_fraction: float = 0.05
    shard_sequences: int = 8192
    workers: int = 0
    shuffle_window: int = 65536

    HELP: ClassVar[dict[str, str]] = {
        "tokenizer": "'builtin' (trained on both stdlib corpora), a forgetless tokenizer "
                     "directory, or a Hugging Face one (sequences then start with its BOS)",
        "text_field": "the JSONL field holding the text",
        "valid_fraction": "fraction of documents held out for validation",
        "shard_sequences": "sequences per shard file",
        "workers": "loader worker processes per rank",
        "shuffle_window": "sequences permuted together after the shards are shuffled (at least "
                          "the split's size: a full permutation each epoch)",
    }

    def __post_init__(self) -> None:
        _check(0 < self.valid_fraction < 1, "data_opts.valid_fraction", "must be in (0, 1)")
        _check(self.shard_sequences > 0, "data_opts.shard_sequences", "must be positive")
        _check(self.workers >= 0, "data_opts.workers", "must be >= 0")
        _check(self.shuffle_window >= 1, "data_opts.shuffle_window", "must be >= 1")


SWITCH_WORDS = {"true": "on", "false": "off"}


@dataclass
class ParallelConfig:
    """Megatron layout: DP = world size / (tp * pp); the batch sizes stay global."""

    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    distributed_optimizer: bool = False
    sequence_parallel: str = "auto"
    overlap_grad_reduce: str = "auto"
    overlap_param_gather: str = "auto"
    fusions: str = "auto"
    recompute: str = "none"

    HELP: ClassVar[dict[str, str]] = {
        "tp": "tensor-parallel ranks",
        "pp": "pipeline stages",
        "microbatches": "microbatches per step and DP rank (pipelining wants several, e.g. 2 x pp)",
        "distributed_optimizer": "shard the optimizer state over data-parallel ranks",
        "sequence_parallel": "auto|on|off: split norms and activations along the sequence over "
                             "TP ranks (auto: on GPUs with tp > 1 and transformer_engine)",
        "overlap_grad_reduce": "auto|on|off: reduce gradients during the backward pass (auto: "
                               "on GPUs with DP > 1)",
        "overlap_param_gather": "auto|on|off: gather the distributed optimizer's parameters "
                                "during the forward pass (auto: on GPUs where it applies)",
        "fusions": "auto|on|off: megatron's fused bias-SwiGLU, and RoPE with transformer_engine "
                   "(auto: on GPUs)",
        "recompute": "none|selective|full: recompute activations in the backward pass "
                     "(selective: core attention; full: every layer)",
    }

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "microbatches"):
            _check(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")
        for key in ("sequence_parallel", "overlap_grad_reduce", "overlap_param_gather",
                    "fusions"):
            # YAML reads on/off (and true/false) as booleans, which arrive here as "True"
            value = SWITCH_WORDS.get(str(getattr(self, key)).lower(), getattr(self, key))
            _one_of(value, f"parallel.{key}", ("auto", "on", "off"))
            setattr(self, key, value)
        _one_of(self.recompute, "parallel.recompute", ("none", "selective", "full"))


# ParallelConfig keys that only a training run uses (forgetless/fast_path.py)
TRAINING_SWITCHES = ("microbatches", "distributed_optimizer", "sequence_parallel",
                     "overlap_grad_reduce", "overlap_param_gather", "fusions", "recompute")

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


@dataclass
class PreemptConfig:
    """On one of these signals every rank stops at the same step, checkpoints, and exits."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    exit_code: int = 75

    HELP: ClassVar[dict[str, str]] = {
        "signals": f"signals that checkpoint and stop the run (of {', '.join(SIGNALS)})",
        "exit_code": "exit status after a preemption (75, EX_TEMPFAIL: what launchers requeue)",
    }

    def __post_init__(self) -> None:
        for name in self.signals:
            _one_of(name, "preempt.signals", SIGNALS)
        _check(1 <= self.exit_code <= 255, "preempt.exit_code", "must be in [1, 255]")


def default_cache_dir() -> str:
    return os.environ.get("FORGETLESS_CACHE", str(Path.home() / ".cache" / "forgetless"))


# help of the keys several programs share
RUN_HELP = {
    "run_dir": "the run's directory: config, metrics, checkpoints",
    "cache_dir": "prepared tokenizers and shards ($FORGETLESS_CACHE)",
    "seed": "seed of initialisation, data order and sampling",
    "threads": "torch intra-op threads; 0: torch's default",
    "resume": "auto: the newest complete checkpoint in run_dir; never; or a checkpoint path",
}


@dataclass
class PretrainConfig:
    """Pretraining from scratch."""

    run_dir: str = "runs/pretrain"
    data: str = "stdlib-prose"
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    data_opts: DataConfig = field(default_factory=DataConfig)

    BUDGET: ClassVar[int] = 1_000_000  # training tokens when no stop condition is set
    HELP: ClassVar[dict[str, str]] = {
        **RUN_HELP,
        "data": "built-in corpus (stdlib-prose, stdlib-code), local source, or manifest.json",
    }

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", "is required")
        _check(bool(self.data), "data", "is required (a built-in corpus, source or manifest)")
        _check(self.threads >= 0, "threads", "must be >= 0")
        self.stop = self.stop.or_budget(self.BUDGET)


@dataclass
class PrepareConfig:
    """Tokenizing a source into shards."""

    source: str = "stdlib-prose"
    out: str = ""
    name: str = ""
    seq_len: int = 128
    vocab: int = 4096
    cache_dir: str = field(default_factory=default_cache_dir)
    data_opts: DataConfig = field(default_factory=DataConfig)

    HELP: ClassVar[dict[str, str]] = {
        "source": "built-in corpus, text file, glob of them, or JSONL",
        "out": "directory for the shards and manifest; '': the cache",
        "name": "dataset (and domain token) name; '': derived from the source",
        "seq_len": "tokens per sequence",
        "vocab": "vocabulary size of the built-in tokenizer",
        "cache_dir": RUN_HELP["cache_dir"],
    }

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, "seq_len", "must be at least 2")
        _check(self.vocab > 0, "vocab", "must be positive")


@dataclass
class TokenizerConfig:
    """Training a BPE tokenizer."""

    sources: list[str] = field(default_factory=lambda: ["stdlib-prose", "stdlib-code"])
    out: str = "runs/tokenizer"
    vocab: int = 4096
    domains: list[str] = field(default_factory=list)
    text_field: str = "text"

    HELP: ClassVar[dict[str, str]] = {
        "sources": "sources to train on (built-in corpora, files, globs, JSONL)",
        "out": "directory for tokenizer.model and tokenizer.json",
        "vocab": "vocabulary size",
        "domains": "domain-token names, one per source; []: named after the sources",
        "text_field": DataConfig.HELP["text_field"],
    }

    def __post_init__(self) -> None:
        _check(bool(self.sources), "sources", "name at least one source")
        _check(self.vocab > 0, "vocab", "must be positive")
        _check(not self.domains or len(set(self.domains)) == len(self.domains), "domains",
               "must be distinct")


CHECKPOINT_HELP = ("a checkpoint directory, a run directory (its newest checkpoint), or a "
                   "Hugging Face model directory")


@dataclass
class EvaluateConfig:
    """Validation loss of a checkpoint."""

    checkpoint: str = ""
    data: str = ""
    max_sequences: int = 0

    HELP: ClassVar[dict[str, str]] = {
        "checkpoint": CHECKPOINT_HELP,
        "data": "data to evaluate on; '': the checkpoint's own validation data",
        "max_sequences": "validation sequences; 0: the whole validation split",
    }


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportConfig:
    """A checkpoint as a Hugging Face model directory (what `transformers` loads)."""

    checkpoint: str = ""
    out: str = ""
    dtype: str = "float32"
    max_shard_size: str = "5GB"

    HELP: ClassVar[dict[str, str]] = {
        "checkpoint": CHECKPOINT_HELP + ", saved under any TP/PP layout (LoRA merged)",
        "out": "the model directory to write (replaced whole, atomically, if it exists)",
        "dtype": f"weight dtype: {', '.join(EXPORT_DTYPES)}",
        "max_shard_size": "largest safetensors file (e.g. 5GB, 500MB); bigger models are sharded",
    }

    def __post_init__(self) -> None:
        _one_of(self.dtype, "dtype", EXPORT_DTYPES)
        _check(bool(re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]B", self.max_shard_size.strip(),
                                 re.IGNORECASE)),
               "max_shard_size", f"{self.max_shard_size!r} is not a size such as 500MB or 5GB")


@dataclass
class SamplingConfig:
    """Ancestral sampling; the defaults follow the model's distribution exactly."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    HELP: ClassVar[dict[str, str]] = {
        "temperature": "softmax temperature; 0: greedy",
        "top_k": "sample among the k most likely tokens; 0: off",
        "top_p": "sample within the top-p probability mass; 1: off",
        "min_p": "keep tokens with probability >= min_p x the largest; 0: off",
    }

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "sampling.temperature", "must be >= 0")
        _check(self.top_k >= 0, "sampling.top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        _check(0 <= self.min_p < 1, "sampling.min_p", "must be in [0, 1)")


@dataclass
class KernelsConfig:
    """Sampling and loss kernels."""

    backend: str = "auto"
    cuda_graph: bool = True

    HELP: ClassVar[dict[str, str]] = {
        "backend": "auto (triton on CUDA, torch on CPU), torch or triton",
        "cuda_graph": "generation on CUDA with triton: each decode step one CUDA-graph replay",
    }

    def __post_init__(self) -> None:
        _one_of(self.backend, "kernels.backend", ("auto", "torch", "triton"))


@dataclass
class GenerateConfig:
    """Self-generated replay: samples from a checkpoint, as shards."""

    checkpoint: str = ""
    out: str = ""
    samples: int = 1024
    first_id: int = 0
    seed: int = 0
    batch_size: int = 64
    shard_samples: int = 512
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    threads: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    HELP: ClassVar[dict[str, str]] = {
        "checkpoint": CHECKPOINT_HELP,
        "out": "directory for the replay shards and their manifest",
        "samples": "sequences to sample",
        "first_id": "sample ids first_id .. first_id + samples - 1",
        "seed": "sampling seed (with the sample id, it fixes a sample's tokens)",
        "batch_size": "sequences sampled at once",
        "shard_samples": "sequences per shard file",
        "threads": RUN_HELP["threads"],
    }

    def __post_init__(self) -> None:
        _check(self.parallel.pp == 1, "parallel.pp", "generation runs with pp=1 (use tp and DP)")
        defaults = ParallelConfig()
        for key in TRAINING_SWITCHES:
            _check(getattr(self.parallel, key) == getattr(defaults, key), f"parallel.{key}",
                   "applies to training; generation does not train")
        for key in ("samples", "batch_size", "shard_samples"):
            _check(getattr(self, key) > 0, key, "must be positive")
        _check(self.first_id >= 0, "first_id", "must be >= 0")


ENGINES = ("megatron", "deepspeed")
OFFLOAD = ("none", "cpu")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO over the data-parallel ranks (engine=deepspeed): stage 1 shards the
    optimizer state, 2 the gradients too, 3 the parameters too (the frozen teacher's as well)."""

    stage: int = 3
    offload_optimizer: str = "none"
    offload_param: str = "none"

    HELP: ClassVar[dict[str, str]] = {
        "stage": "ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)",
        "offload_optimizer": "none|cpu: keep the optimizer state (and its step) in CPU memory",
        "offload_param": "none|cpu: keep the partitioned parameters in CPU memory (stage 3)",
    }

    def __post_init__(self) -> None:
        _check(self.stage in (1, 2, 3), "deepspeed.stage", f"must be 1, 2 or 3, got {self.stage!r}")
        _one_of(self.offload_optimizer, "deepspeed.offload_optimizer", OFFLOAD)
        _one_of(self.offload_param, "deepspeed.offload_param", OFFLOAD)
        _check(self.offload_param == "none" or self.stage == 3, "deepspeed.offload_param",
               f"offloads partitioned parameters, which only stage 3 has (stage={self.stage})")

    def changed(self) -> list[str]:
        default = DeepSpeedConfig()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


# parallel.* settings that megatron's engine has and DeepSpeed's does not: (key, default)
MEGATRON_ONLY = (("pp", 1), ("tp", 1), ("distributed_optimizer", False),
                 ("sequence_parallel", "auto"), ("overlap_grad_reduce", "auto"),
                 ("overlap_param_gather", "auto"))

METHODS = ("none", "lora", "replace", "ntp_pre", "kl_pre", "kl_dwn")
REPLAY_METHODS = ("replace", "ntp_pre", "kl_pre")
REPLAY_SOURCES = ("none", "self", "real", "onthefly")
# Where each replay.* key takes effect: (methods, replay sources). Anywhere else it would do
# nothing, so a value other than its default is an error.
REPLAY_KEYS = {
    "source": (REPLAY_METHODS, REPLAY_SOURCES),
    "data": (REPLAY_METHODS, ("self",)),
    "allow_foreign": (REPLAY_METHODS, ("self",)),
    "batch_size": (("ntp_pre", "kl_pre"), REPLAY_SOURCES),
    "buffer_batches": (REPLAY_METHODS, ("onthefly",)),
    "seed": (REPLAY_METHODS, ("onthefly",)),
    "sampling": (REPLAY_METHODS, ("onthefly",)),
}


@dataclass
class ReplayConfig:
    """Replay data for the replay methods (replace, ntp_pre, kl_pre)."""

    source: str = "none"
    data: str = ""
    batch_size: int = 16
    buffer_batches: int = 16
    seed: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    allow_foreign: bool = False

    HELP: ClassVar[dict[str, str]] = {
        "source": "none, self (replay.data), real (the previous data) or onthefly (the teacher)",
        "data": "source=self: the manifest written by `forgetless generate`",
        "batch_size": "ntp_pre, kl_pre: replay sequences per step",
        "buffer_batches": "onthefly: replay batches sampled from the teacher at a time",
        "seed": "onthefly: sampling seed",
        "allow_foreign": "source=self: accept replay generated from another checkpoint than "
                         "the base (recorded in the run)",
    }

    def __post_init__(self) -> None:
        _one_of(self.source, "replay.source", REPLAY_SOURCES)
        _check(self.source != "self" or bool(self.data), "replay.data",
               "replay.source=self needs the manifest of `forgetless generate`")
        _check(self.batch_size > 0, "replay.batch_size", "must be positive")
        _check(self.buffer_batches > 0, "replay.buffer_batches", "must be positive")

    def changed(self) -> list[str]:
        """The keys (sampling's as sampling.KEY) set to something other than the default."""
        values, defaults = flat(asdict(self)), flat(asdict(ReplayConfig()))
        return [key for key, value in values.items() if value != defaults[key]]

    def for_run(self, method: str, source: str, data: str) -> ReplayConfig:
        """These settings for a run of `method` with replay `source` (manifest `data`): the
        keys that run does not use back at their defaults."""
        default = ReplayConfig()
        kept = {f.name: getattr(self if replay_key_applies(f.name, method, source) else default,
                                f.name) for f in fields(ReplayConfig)}
        return ReplayConfig(**{**kept, "source": source,
                               "data": data if source == "self" else ""})


def replay_key_applies(key: str, method: str, source: str) -> bool:
    """Whether replay.KEY (or replay.KEY.sub) has an effect in a run of method and source."""
    methods, sources = REPLAY_KEYS[key.split(".")[0]]
    return method in methods and source in sources


@dataclass
class LoraConfig:
    """LoRA adapters (method=lora)."""

    rank: int = 8
    alpha: float = 16.0

    HELP: ClassVar[dict[str, str]] = {
        "rank": "adapter rank",
        "alpha": "adapter scale numerator (the update is alpha / rank x B A)",
    }

    def __post_init__(self) -> None:
        _check(self.rank > 0, "lora.rank", "must be positive")


@dataclass
class FinetuneConfig:
    """Finetuning a pretrained checkpoint, with or without replay."""

    run_dir: str = "runs/finetune"
    checkpoint: str = ""
    data: str = "stdlib-code"
    prev_data: str = ""
    method: str = "none"
    lam: float = 10.0
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    threads: int = 0
    opt: OptConfig = field(default_factory=lambda: OptConfig(
        lr=1e-3, warmup_steps=10, schedule="constant", weight_decay=0.0))
    stop: StopConfig = field(default_factory=StopConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(interval=25,
                                                                max_sequences=256))
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    data_opts: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    engine: str = "megatron"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    BUDGET: ClassVar[int] = 500_000  # downstream tokens when no stop condition is set
    HELP: ClassVar[dict[str, str]] = {
        **RUN_HELP,
        "checkpoint": "the pretrained checkpoint, its run directory, or a Hugging Face model",
        "data": "the downstream data: built-in corpus, local source, or manifest.json",
        "prev_data": "previous-distribution data (source or manifest) for prev_* metrics and real "
                     "replay; '': the checkpoint's (required for a Hugging Face base)",
        "method": f"one of {', '.join(METHODS)}",
        "lam": "the paper's lambda: replay loss weight; for replace, the replay fraction",
        "engine": "megatron (DDP, distributed optimizer; TP x PP x DP) or deepspeed (ZeRO 1-3 "
                  "over DP, CPU offload; for memory-bound finetuning)",
    }

    def __post_init__(self) -> None:
        _one_of(self.method, "method", METHODS)
        _check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        _check(self.stop.tokens_per_param is None, "stop.tokens_per_param",
               "finetuning counts no parameters; use stop.tokens, stop.epochs or stop.steps")
        self.stop = self.stop.or_budget(self.BUDGET)
        self.check_method()
        self.check_engine()

    def check_engine(self) -> None:
        """DeepSpeed settings only with engine=deepspeed; megatron's layout switches only
        with engine=megatron."""
        _one_of(self.engine, "engine", ENGINES)
        if self.engine == "megatron":
            for key in self.deepspeed.changed():
                raise ConfigError(f"deepspeed.{key}: has no effect with engine=megatron "
                                  f"(set engine=deepspeed)")
            return
        for key, default in MEGATRON_ONLY:
            value = getattr(self.parallel, key)
            _check(value in (default, "off"), f"parallel.{key}",
                   f"{value!r} is megatron's; engine=deepspeed shards over data-parallel "
                   f"ranks only (ZeRO partitions the optimizer state, gradients and "
                   f"parameters; use engine=megatron for tensor or pipeline parallelism)")
        _check(self.deepspeed.stage < 3 or self.replay.source != "onthefly", "replay.source",
               "onthefly samples from the teacher, whose parameters ZeRO-3 partitions: each "
               "decoding step would gather every layer over the ranks; generate the replay "
               "first (forgetless generate) and use replay.source=self, or deepspeed.stage<=2")

    def check_method(self) -> None:
        """The settings that depend on the method and replay source."""
        if self.method == "replace":
            self._check_replace()
        if self.method in REPLAY_METHODS:
            _check(self.replay.source != "none", "replay.source",
                   f"method {self.method} needs replay: self, real or onthefly")
        _check(self.method in REPLAY_METHODS or self.replay.source == "none", "replay.source",
               f"method {self.method} takes no replay (replay methods: "
               f"{', '.join(REPLAY_METHODS)}); got {self.replay.source!r}")
        for key in self.replay.changed():
            methods, sources = REPLAY_KEYS[key.split(".")[0]]
            where = f"method {' / '.join(methods)}" + (
                "" if sources == REPLAY_SOURCES else f" with replay.source {' / '.join(sources)}")
            _check(replay_key_applies(key, self.method, self.replay.source), f"replay.{key}",
                   f"has no effect with method={self.method}, replay.source="
                   f"{self.replay.source} (it applies to {where})")

    def _check_replace(self) -> None:
        _check(0 <= self.lam <= 1, "lam",
               f"for method=replace it is the replay fraction, in [0, 1]; got {self.lam}")
        batch = self.opt.batch_size
        _check(batch >= 2, "opt.batch_size",
               "method=replace needs at least 2 rows: one replay, one downstream")
        rows = round(self.lam * batch)
        _check(1 <= rows <= batch - 1, "lam",
               f"for method=replace it must leave at least one replay and one downstream row "
               f"of opt.batch_size={batch}: lam in [{1 / batch:g}, {(batch - 1) / batch:g}]; "
               f"got {self.lam} ({rows} replay rows)")


def parse_run(spec: str) -> tuple[str, str]:
    """(method, replay source) of a quickstart/study run `method[:replay source]`."""
    method, _, source = spec.partition(":")
    source = source or "none"
    _one_of(method, "runs", METHODS)
    _one_of(source, "runs", REPLAY_SOURCES)
    _check(method in REPLAY_METHODS or source == "none", "runs",
           f"{spec!r}: method {method} takes no replay (write {method!r})")
    _check(method not in REPLAY_METHODS or source != "none", "runs",
           f"{spec!r}: method {method} needs a replay source ({method}:self, {method}:real "
           f"or {method}:onthefly)")
    return method, source


@dataclass
class QuickstartFinetuneConfig(FinetuneConfig):
    """The finetune settings every quickstart run starts from (each sets its method and
    replay source; `for_run` gives a run's own)."""

    eval: EvalConfig = field(default_factory=lambda: EvalConfig(interval=20, max_sequences=64))

    BUDGET: ClassVar[int] = 320_000

    def check_method(self) -> None:
        """Nothing here: QuickstartConfig checks each run's settings (`for_run`)."""

    def for_run(self, spec: str, replay_data: str) -> FinetuneConfig:
        """The validated settings of run `spec` (`method[:replay source]`, self-replay from
        the manifest `replay_data`); replay keys it does not use keep their defaults."""
        method, source = parse_run(spec)
        values = {f.name: getattr(self, f.name) for f in fields(FinetuneConfig)}
        return FinetuneConfig(**{**values, "method": method,
                                 "replay": self.replay.for_run(method, source, replay_data)})


def _unbudgeted(cfg: T) -> T:
    """A nested program's defaults with no stop condition. OmegaConf takes a default
    factory's values as the defaults, so a budget filled in there would join any stop
    condition the user sets; the budget is filled in from the merged values instead."""
    cfg.stop = StopConfig()
    return cfg


def default_runs() -> list[str]:
    return ["none", "lora", "ntp_pre:self", "kl_pre:self", "kl_pre:real"]


# keys quickstart sets itself for each stage: a value given for them would do nothing
QUICKSTART_SETS = ("pretrain.run_dir", "generate.checkpoint", "generate.out",
                   "finetune.run_dir", "finetune.checkpoint", "finetune.method",
                   "finetune.replay.source", "finetune.replay.data")


@dataclass
class QuickstartConfig:
    """The whole pipeline on the built-in corpora: prose -> code, one finetune per run."""

    out: str = "runs/quickstart"
    runs: list[str] = field(default_factory=default_runs)
    pretrain: PretrainConfig = field(default_factory=lambda: _unbudgeted(PretrainConfig(
        eval=EvalConfig(interval=100, max_sequences=128))))
    # 79 finetuning steps of 32 x 128 downstream tokens, 16 replay rows each: 1264 samples
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(samples=1280))
    finetune: QuickstartFinetuneConfig = field(
        default_factory=lambda: _unbudgeted(QuickstartFinetuneConfig()))

    SETS: ClassVar[tuple[str, ...]] = QUICKSTART_SETS
    HELP: ClassVar[dict[str, str]] = {
        "out": "directory of every stage (finished stages are reused)",
        "runs": "finetunes, each method[:replay source], e.g. kl_pre:self",
    }

    def __post_init__(self) -> None:
        defaults = {name: _field_default(QuickstartConfig, name)
                    for name in ("pretrain", "generate", "finetune")}
        for key in self.SETS:
            _check(_get(self, key) == _get(defaults, key), key,
                   "quickstart sets it for each stage (directories from out=, method and "
                   "replay from runs=)")
        for spec in self.runs:
            parse_run(spec)
            try:
                self.finetune.for_run(spec, "replay")
            except ConfigError as e:
                raise ConfigError(f"runs: {spec!r}: {e}") from e
        for key in self.finetune.replay.changed():
            _check(any(replay_key_applies(key, *parse_run(spec)) for spec in self.runs),
                   f"finetune.replay.{key}", f"has no effect in any of runs={self.runs}")


def _field_default(cls: type, name: str) -> Any:
    found = next(f for f in fields(cls) if f.name == name)
    return found.default_factory() if found.default is MISSING else found.default


def _get(obj: Any, key: str) -> Any:
    """The value at a dotted key of a config (or of a dict of configs)."""
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def flat(values: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def require(cfg: Any, *keys: str) -> None:
    """Settings without a usable default (paths) must be given."""
    for key in keys:
        _check(bool(getattr(cfg, key)), key, "is required")


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) of every setting of a schema, each group of settings
    first as (`group.*`, '', its docstring's first line): the listing of `--help`."""
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    rows = []
    for f in fields(schema):
        key, value = f"{prefix}{f.name}", defaults[f.name]
        kind = type(_field_default(schema, f.name))
        if is_dataclass(kind):
            rows.append((f"{key}.*", "", " ".join((kind.__doc__ or "").split("\n\n")[0].split())))
            rows += describe(kind, f"{key}.")
            if f.name == "stop" and hasattr(schema, "BUDGET"):
                rows = [(k, f"null ({schema.BUDGET} if no stop.* is set)", h)
                        if k == f"{key}.tokens" else (k, d, h) for k, d, h in rows]
            continue
        rows.append((key, _shown(value), schema.HELP.get(f.name, "")))
    sets = getattr(schema, "SETS", ())
    return [(k, "(set per stage)" if k in sets else d, h) for k, d, h in rows]


def _shown(value: Any) -> str:
    """A default as it would be written in YAML or on the command line."""
    if isinstance(value, str):
        return value or "''"
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"recipe: file {recipe} does not exist")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.exists():
        raise ConfigError(f"recipe: no recipe named {recipe!r} "
                          f"(known: {', '.join(recipe_names())})")
    return path


def read_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (empty: {}); errors name `what` and the file."""
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: invalid YAML: {e}") from e
    if not isinstance(content, dict):
        raise ConfigError(f"{what} {path}: must be a mapping of keys to values")
    return content


def load(schema: type[T], recipe: str | None = None, overrides: list[str] = ()) -> T:
    """Schema defaults <- YAML recipe <- key=value overrides, validated."""
    layers: list[Any] = [OmegaConf.structured(schema)]
    if recipe:
        layers.append(OmegaConf.create(read_mapping(_recipe_path(recipe), "recipe")))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides are key=value")
        key, _, value = item.partition("=")
        layers.append(OmegaConf.from_dotlist([f"{key}={value}"]))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (`--print-config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_dict(schema: type[T], values: dict, overrides: list[str] = ()) -> T:
    """Schema defaults <- a dict of values <- key=value overrides, validated."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values,
                                                   OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from e
