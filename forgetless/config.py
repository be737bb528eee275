"""One typed config schema: dataclass defaults, overridden by a YAML recipe, then key=value.

Unknown keys and invalid values raise ConfigError naming the key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from forgetless.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 4
    head_dim: int = 32
    heads: int = 0  # 0: hidden // head_dim
    ffn_hidden: int = 0  # 0: 4 * hidden (gelu) or 8/3 * hidden rounded up to 64 (swiglu)
    seq_len: int = 128
    vocab: int = 4096
    mlp: str = "swiglu"
    qk_norm: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "head_dim", "seq_len", "vocab"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _check(self.seq_len >= 2, "model.seq_len", "must be at least 2")
        _one_of(self.mlp, "model.mlp", ("swiglu", "gelu"))
        _check(self.heads >= 0, "model.heads", "must be >= 0")
        _check(self.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0")
        _check(self.heads or self.hidden % self.head_dim == 0, "model.head_dim",
               "must divide model.hidden (or set model.heads)")

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

    def resolved(self) -> dict:
        """Every architecture-defining value, derived ones filled in."""
        return {**asdict(self), "heads": self.num_heads, "ffn_hidden": self.ffn_size}


@dataclass
class OptConfig:
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
    precision: str = "fp32"  # bf16: bf16 weights and math, fp32 master weights in the optimizer

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


@dataclass
class StopConfig:
    """Training stops at the first condition reached; at least one must be set."""

    tokens: int | None = None
    tokens_per_param: float | None = None
    epochs: float | None = None
    valid_loss: float | None = None
    steps: int | None = None
    patience: int | None = None  # early stopping: evaluations without a better valid_ntp

    def __post_init__(self) -> None:
        for key in ("tokens", "tokens_per_param", "epochs", "valid_loss", "steps", "patience"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"stop.{key}", "must be positive")
        _check(
            any(getattr(self, k) is not None for k in ("tokens", "tokens_per_param", "epochs",
                                                         "valid_loss", "steps", "patience")),
            "stop",
            "set at least one of stop.tokens, stop.tokens_per_param, stop.epochs, "
            "stop.valid_loss, stop.steps, stop.patience",
        )


@dataclass
class EvalConfig:
    interval: int = 100  # steps between evaluations
    max_sequences: int = 512  # validation sequences per evaluation (0: all)
    log_interval: int = 10
    peak_tflops: float = 0.0  # per rank, for model FLOPs utilisation; 0: not reported

    def __post_init__(self) -> None:
        _check(self.peak_tflops >= 0, "eval.peak_tflops", "must be >= 0")
        _check(self.interval > 0, "eval.interval", "must be positive")
        _check(self.max_sequences >= 0, "eval.max_sequences", "must be >= 0")
        _check(self.log_interval > 0, "eval.log_interval", "must be positive")


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2

    def __post_init__(self) -> None:
        _check(self.interval >= 0, "ckpt.interval", "must be >= 0")
        _check(self.keep >= 1, "ckpt.keep", "must be >= 1")


@dataclass
class DataConfig:
    """How a corpus becomes token shards (used when `data=` names a source to prepare)."""

    tokenizer: str = "builtin"  # 'builtin' (trained on both stdlib corpora) or a .model path
    text_field: str = "text"  # JSONL field holding the text
    valid_fraction: float = 0.05
    shard_sequences: int = 8192
    workers: int = 0  # loader worker processes per rank
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        _check(0 < self.valid_fraction < 1, "data_opts.valid_fraction", "must be in (0, 1)")
        _check(self.shard_sequences > 0, "data_opts.shard_sequences", "must be positive")
        _check(self.workers >= 0, "data_opts.workers", "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data_opts.shuffle_buffer", "must be >= 1")


@dataclass
class ParallelConfig:
    """Megatron layout: DP = world size / (tp * pp); the batch sizes stay global."""

    tp: int = 1
    pp: int = 1
    microbatches: int = 1  # per step and DP rank; pipelining wants several (e.g. 2 * pp)
    distributed_optimizer: bool = False  # shard optimizer state over DP ranks

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "microbatches"):
            _check(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")


SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


@dataclass
class PreemptConfig:
    """On one of these signals every rank stops at the same step, checkpoints, and exits."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    exit_code: int = 75  # EX_TEMPFAIL: "try again", what a launcher requeues on

    def __post_init__(self) -> None:
        for name in self.signals:
            _one_of(name, "preempt.signals", SIGNALS)
        _check(1 <= self.exit_code <= 255, "preempt.exit_code", "must be in [1, 255]")


def default_cache_dir() -> str:
    return os.environ.get("FORGETLESS_CACHE", str(Path.home() / ".cache" / "forgetless"))


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    data: str = "stdlib-prose"  # built-in corpus, local source, or a prepared manifest.json
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    stop: StopConfig = field(default_factory=lambda: StopConfig(tokens=1_000_000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto: the newest complete checkpoint in run_dir; never; or a path
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    data_opts: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", "is required")
        _check(bool(self.data), "data", "is required (a built-in corpus, source or manifest)")
        _check(self.threads >= 0, "threads", "must be >= 0")


@dataclass
class PrepareConfig:
    source: str = "stdlib-prose"
    out: str = ""  # directory for shards and manifest; '' uses the cache
    name: str = ""  # dataset (and domain token) name; '' derives it from the source
    seq_len: int = 128
    vocab: int = 4096
    cache_dir: str = field(default_factory=default_cache_dir)
    data_opts: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, "seq_len", "must be at least 2")
        _check(self.vocab > 0, "vocab", "must be positive")


@dataclass
class TokenizerConfig:
    sources: list[str] = field(default_factory=lambda: ["stdlib-prose", "stdlib-code"])
    out: str = "runs/tokenizer"
    vocab: int = 4096
    domains: list[str] = field(default_factory=list)  # [] : one per source, named after it
    text_field: str = "text"

    def __post_init__(self) -> None:
        _check(bool(self.sources), "sources", "name at least one source")
        _check(self.vocab > 0, "vocab", "must be positive")
        _check(not self.domains or len(set(self.domains)) == len(self.domains), "domains",
               "must be distinct")


@dataclass
class EvaluateConfig:
    checkpoint: str = ""  # a checkpoint directory, or a run directory (its newest checkpoint)
    data: str = ""  # '' evaluates on the checkpoint's own validation data
    max_sequences: int = 0  # 0: the whole validation split


@dataclass
class SamplingConfig:
    """Ancestral sampling; the defaults follow the model's distribution exactly."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # keep tokens with probability >= min_p x the largest; 0: off

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "sampling.temperature", "must be >= 0")
        _check(self.top_k >= 0, "sampling.top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        _check(0 <= self.min_p < 1, "sampling.min_p", "must be in [0, 1)")


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto: triton on CUDA, torch on CPU; torch; triton
    cuda_graph: bool = True  # generation on CUDA with triton: each decode step a graph replay

    def __post_init__(self) -> None:
        _one_of(self.backend, "kernels.backend", ("auto", "torch", "triton"))


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # a checkpoint directory, or a run directory (its newest checkpoint)
    out: str = ""  # directory for replay shards and their manifest
    samples: int = 1024
    first_id: int = 0  # sample ids first_id .. first_id + samples - 1
    seed: int = 0
    batch_size: int = 64
    shard_samples: int = 512
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    threads: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        _check(self.parallel.pp == 1, "parallel.pp", "generation runs with pp=1 (use tp and DP)")
        for key in ("samples", "batch_size", "shard_samples"):
            _check(getattr(self, key) > 0, key, "must be positive")
        _check(self.first_id >= 0, "first_id", "must be >= 0")


METHODS = ("none", "lora", "replace", "ntp_pre", "kl_pre", "kl_dwn")
REPLAY_METHODS = ("replace", "ntp_pre", "kl_pre")


@dataclass
class ReplayConfig:
    source: str = "none"  # none | self (replay.data) | real (previous data) | onthefly
    data: str = ""  # replay manifest for source=self
    batch_size: int = 16
    buffer_batches: int = 16  # onthefly: batches sampled from the teacher at a time
    seed: int = 1  # onthefly sampling seed
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        _one_of(self.source, "replay.source", ("none", "self", "real", "onthefly"))
        _check(self.source != "self" or bool(self.data), "replay.data",
               "replay.source=self needs the manifest of `forgetless generate`")
        _check(self.batch_size > 0, "replay.batch_size", "must be positive")
        _check(self.buffer_batches > 0, "replay.buffer_batches", "must be positive")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        _check(self.rank > 0, "lora.rank", "must be positive")


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    checkpoint: str = ""  # the pretrained checkpoint (or its run directory)
    data: str = "stdlib-code"  # the downstream data
    prev_data: str = ""  # previous-distribution data for prev_*; '' : the checkpoint's
    method: str = "none"
    lam: float = 10.0  # the paper's lambda: replay loss weight, or for `replace` the fraction
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    threads: int = 0
    opt: OptConfig = field(default_factory=lambda: OptConfig(
        lr=1e-3, warmup_steps=10, schedule="constant", weight_decay=0.0))
    stop: StopConfig = field(default_factory=lambda: StopConfig(tokens=500_000))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(interval=25,
                                                                max_sequences=256))
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto: the newest complete checkpoint in run_dir; never; or a path
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    data_opts: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        _one_of(self.method, "method", METHODS)
        _check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        if self.method == "replace":
            _check(0 <= self.lam <= 1, "lam",
                   f"for method=replace it is the replay fraction, in [0, 1]; got {self.lam}")
        if self.method in REPLAY_METHODS:
            _check(self.replay.source != "none", "replay.source",
                   f"method {self.method} needs replay: self, real or onthefly")


def default_runs() -> list[str]:
    return ["none", "lora", "ntp_pre:self", "kl_pre:self", "kl_pre:real"]


@dataclass
class QuickstartConfig:
    """The whole pipeline on the built-in corpora: prose -> code, one finetune per run."""

    out: str = "runs/quickstart"
    runs: list[str] = field(default_factory=default_runs)  # method[:replay source]
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        eval=EvalConfig(interval=100, max_sequences=128)))
    # 79 finetuning steps of 32 x 128 downstream tokens, 16 replay rows each: 1264 samples
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(samples=1280))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        stop=StopConfig(tokens=320_000), eval=EvalConfig(interval=20, max_sequences=64)))

    def __post_init__(self) -> None:
        for spec in self.runs:
            method, _, source = spec.partition(":")
            _one_of(method, "runs", METHODS)
            _one_of(source or "none", "runs", ("none", "self", "real", "onthefly"))


def require(cfg: Any, *keys: str) -> None:
    """Settings without a usable default (paths) must be given."""
    for key in keys:
        _check(bool(getattr(cfg, key)), key, "is required")


T = TypeVar("T")


def _recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"recipe: file {recipe} does not exist")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"recipe: no recipe named {recipe!r} (known: {known})")
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


def load_dict(schema: type[T], values: dict, overrides: list[str] = ()) -> T:
    """Schema defaults <- a dict of values <- key=value overrides, validated."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values,
                                                   OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from e
