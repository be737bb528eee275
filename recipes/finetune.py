"""`forgetless finetune`: train a pretrained checkpoint on downstream data, with or without
replay, measuring forgetting on the previous distribution against the frozen teacher.

Methods (the paper's lambda is `lam`): none, lora, replace (a fraction lam of each batch's rows
is replay), ntp_pre (+ lam x next-token loss on replay), kl_pre (+ lam x KL(teacher || student)
on replay), kl_dwn (+ lam x the same KL on the downstream batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path

import torch

from forgetless import (
    checkpoint,
    config,
    fast_path,
    kernels,
    lora,
    losses,
    parallel,
    runlock,
    schedule,
)
from forgetless.config import FinetuneConfig, KernelsConfig, SamplingConfig
from forgetless.data import catalog
from forgetless.data import tokenizer as tok
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import DataError, Manifest, load_manifest
from forgetless.engine import Engine, MegatronEngine
from forgetless.errors import UserError
from forgetless.evaluation import eval_set, evaluate
from forgetless.kernels.losses import kl_ce
from forgetless.model import flops_per_token, with_precision
from forgetless.sampler import generate
from forgetless.schedule import Micro, mean_share, split
from forgetless.train import PROGRESS, Run, initial_state, step_budget, train


class OnTheFlyReplay:
    """Replay sampled from the teacher during training, buffer_batches batches at a time.

    Sample ids count up from 0, so the state is the next id: a resumed run regenerates the
    buffer that id falls in (identically) and continues from it. Each data-parallel rank
    samples only its share of every batch."""

    def __init__(self, teacher: torch.nn.Module, first_token: int, seq_len: int,
                 batch_size: int, buffer_batches: int, seed: int, sampling: SamplingConfig,
                 state: dict | None, kernel_cfg: KernelsConfig):
        self.teacher, self.first_token, self.seq_len = teacher, first_token, seq_len
        self.batch_size, self.buffer_size = batch_size, batch_size * buffer_batches
        self.seed, self.sampling = seed, config.to_dict(sampling)
        self.kernels = config.to_dict(kernel_cfg)
        self.next_id = state["next_id"] if state else 0
        self.buffer_start, self.buffer = -1, torch.empty(0)

    def __next__(self) -> torch.Tensor:
        start = self.next_id // self.buffer_size * self.buffer_size
        if start != self.buffer_start:
            batches = torch.arange(start, start + self.buffer_size).view(-1, self.batch_size)
            ids = torch.stack([parallel.split_rows(batch) for batch in batches])
            self.buffer = generate(self.teacher, self.first_token, ids.flatten(), self.seq_len,
                                   self.seed, **self.sampling, **self.kernels
                                   ).view(*ids.shape, self.seq_len)
            self.buffer_start = start
        batch = (self.next_id - start) // self.batch_size
        self.next_id += self.batch_size
        return self.buffer[batch]

    def state_dict(self) -> dict:
        return {"next_id": self.next_id}


@dataclass
class FinetuneBatches:
    down: Loader
    replay: Loader | OnTheFlyReplay | None

    def __next__(self) -> dict:
        return {"down": next(self.down),
                "replay": next(self.replay) if self.replay is not None else None}

    def state_dict(self) -> dict:
        return {"down": self.down.state_dict(),
                "replay": self.replay.state_dict() if self.replay is not None else None}


def _check_matches(manifest: Manifest, base: dict, what: str) -> None:
    """Data must be tokenized like the checkpoint and cut to its seq_len."""
    seq_len, tok_hash = base["model"]["seq_len"], base["tokenizer"]["hash"]
    if manifest.seq_len != seq_len:
        raise DataError(f"{what} {manifest.path}: seq_len {manifest.seq_len} does not match the "
                        f"checkpoint's model.seq_len {seq_len}")
    if manifest.tokenizer_hash != tok_hash:
        raise DataError(f"{what} {manifest.path}: tokenizer hash {manifest.tokenizer_hash[:12]} "
                        f"does not match the checkpoint's tokenizer {tok_hash[:12]}")


def replay_rows(cfg: FinetuneConfig) -> int:
    """Replay rows per step: replay.batch_size, or for `replace` the fraction lam of the batch."""
    if cfg.method == "replace":
        return round(cfg.lam * cfg.opt.batch_size)
    return cfg.replay.batch_size if cfg.method in config.REPLAY_METHODS else 0


def replace_rows(down: torch.Tensor, replay: torch.Tensor | None) -> torch.Tensor:
    """The `replace` batch: the downstream rows, then the replay rows that take their place."""
    return down if replay is None else torch.cat([down, replay])


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The frozen teacher's logits per microbatch (on the last stage; [] elsewhere)."""
    return schedule.run(teacher, [Micro(c, labels=False) for c in chunks], forward_only=True)


def make_plan(cfg: FinetuneConfig, teacher: torch.nn.Module, size: int
              ) -> Callable[[dict], list[Micro]]:
    """A step's microbatches: downstream rows in microbatches of `size` rows, then the replay
    rows (one microbatch, or `size`-row ones under pipelining). Each returns its share of
    down_loss + lam * reg_loss. The student sees the regularised rows exactly as the teacher
    does (same microbatches), so at step 0 both logits agree bit for bit and the KL gradient
    is zero."""
    method, lam = cfg.method, cfg.lam
    fused = kernels.backend(cfg.kernels.backend) == "triton"  # kernels/losses.py

    def plan(batch: dict) -> list[Micro]:
        down, replay = batch["down"], batch["replay"]
        if method == "replace":
            down, replay = replace_rows(down, replay), None
        chunks = split(down, size)
        n = len(chunks)
        if method == "kl_dwn":
            targets = teacher_logits(teacher, chunks)
            return [Micro(c, partial(_ntp_and_kl, tokens=c, target=t, lam=lam, n=n,
                                     fused=fused), labels=False)
                    for c, t in zip_longest(chunks, targets) if c is not None]
        name = "down_loss" if replay is not None else None
        micros = [Micro(c, partial(mean_share, weight=1.0, n=n, name=name)) for c in chunks]
        if replay is None:
            return micros
        replay_chunks = split(replay, size if parallel.pp_size() > 1 else replay.size(0))
        m = len(replay_chunks)
        if method == "ntp_pre":
            return micros + [Micro(c, partial(mean_share, weight=lam, n=m, name="reg_loss"))
                             for c in replay_chunks]
        targets = teacher_logits(teacher, replay_chunks)
        return micros + [Micro(c, partial(_kl, target=t, tokens=c, lam=lam, n=m, fused=fused),
                               labels=False)
                         for c, t in zip_longest(replay_chunks, targets) if c is not None]

    return plan


def _kl(student: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor, lam: float,
        n: int, fused: bool):
    kl = (kl_ce(student, target, tokens[:, 1:].t(), group=parallel.vocab_group())[0] if fused
          else losses.kl(student, target))
    value = kl.mean() / n
    return lam * value, {"reg_loss": value.detach()}


def _ntp_and_kl(student: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor,
                lam: float, n: int, fused: bool):
    if fused:  # one pass gives both
        kl, ce = kl_ce(student, target, tokens[:, 1:].t(), group=parallel.vocab_group())
    else:  # the KL first: ntp consumes the logits
        kl = losses.kl(student, target)
        ce = losses.ntp(student, tokens)
    reg, down = kl.mean() / n, ce.mean() / n
    return down + lam * reg, {"down_loss": down.detach(), "reg_loss": reg.detach()}


def _tokenizer_hash(spec: str) -> str:
    try:
        return tok.load(spec).hash
    except UserError as e:
        raise config.ConfigError(f"data_opts.tokenizer: {e}") from e


def _tokenizer_opts(cfg: FinetuneConfig, base: dict) -> config.DataConfig:
    """Data options with the base checkpoint's tokenizer: a finetune must tokenize like its
    base, so another data_opts.tokenizer would be ignored; it is refused instead."""
    spec, base_tok = cfg.data_opts.tokenizer, base["tokenizer"]
    if spec != config.DataConfig.tokenizer and _tokenizer_hash(spec) != base_tok["hash"]:
        raise config.ConfigError(
            f"data_opts.tokenizer: {spec} is not the tokenizer of the base checkpoint "
            f"({base_tok['path']}, hash {base_tok['hash'][:12]}); a finetune tokenizes with "
            f"its base's tokenizer: leave data_opts.tokenizer unset")
    if catalog.is_manifest(cfg.data):  # tokenized already: _check_matches compares it
        return cfg.data_opts
    return config.DataConfig(**{**config.to_dict(cfg.data_opts), "tokenizer": base_tok["path"]})


def replay_provenance(cfg: FinetuneConfig, source: Manifest, base_path: Path,
                      base_hash: str) -> dict:
    """Self-replay must come from the base checkpoint (its provenance hash); other replay only
    with replay.allow_foreign=true. What the run records of it."""
    provenance = source.data.get("provenance") or {}
    made_from = provenance.get("checkpoint_hash")
    foreign = made_from != base_hash
    if foreign and not cfg.replay.allow_foreign:
        what = (f"was generated from checkpoint {provenance.get('checkpoint')} "
                f"({made_from[:12]})" if made_from else
                "is plain data (its manifest has no provenance), not self-generated replay")
        raise DataError(
            f"replay.data {source.path} {what}; replay.source=self replays samples of the "
            f"finetune's base {base_path} ({base_hash[:12]}): generate them from it, or set "
            f"replay.allow_foreign=true to replay these anyway")
    return {"replay_foreign": foreign, "replay_checkpoint_hash": made_from}


@dataclass
class Inputs:
    """What a finetune starts from, checked before run_dir is touched."""

    base_path: Path
    base_hash: str
    model_cfg: config.ModelConfig
    tokenizer: tok.Tokenizer
    down: Manifest
    prev: Manifest
    replay_source: Manifest | None  # replay shards read from disk (self or real)
    about: dict  # where the replay comes from, recorded in checkpoints and metrics


def _inputs(cfg: FinetuneConfig) -> Inputs:
    config.require(cfg, "checkpoint")
    base_path = checkpoint.resolve(cfg.checkpoint)
    base = checkpoint.read_state(base_path)
    parallel.init(cfg.seed, cfg.threads, cfg.parallel.tp, cfg.parallel.pp)
    if cfg.replay.source == "onthefly" and parallel.pp_size() > 1:
        raise config.ConfigError("replay.source: onthefly samples from the teacher, which "
                                 "needs parallel.pp=1")
    model_cfg = config.load_dict(config.ModelConfig, base["model"])
    tokenizer, down = catalog.resolve(cfg.data, cfg.cache_dir, model_cfg.seq_len,
                                      model_cfg.vocab, _tokenizer_opts(cfg, base))
    prev = _prev_data(cfg, base, base_path, model_cfg)
    for manifest, what in ((down, "data"), (prev, "prev_data")):
        _check_matches(manifest, base, what)
    # reads every weight file: once per run, on rank 0
    base_hash = parallel.from_main(lambda: checkpoint.content_hash(base_path))
    about = {"replay_foreign": False, "replay_checkpoint_hash":
             base_hash if cfg.replay.source == "onthefly" else None}
    source = None
    if replay_rows(cfg) and cfg.replay.source in ("self", "real"):
        source = load_manifest(cfg.replay.data) if cfg.replay.source == "self" else prev
        _check_matches(source, base, "replay.data")
        if cfg.replay.source == "self":
            about = replay_provenance(cfg, source, base_path, base_hash)
    return Inputs(base_path, base_hash, model_cfg, tokenizer, down, prev, source, about)


def _prev_data(cfg: FinetuneConfig, base: dict, base_path: Path,
               model_cfg: config.ModelConfig) -> Manifest:
    """The previous distribution: prev_data (a manifest, or a source tokenized like the base),
    else the data the base was trained on (which a Hugging Face model does not record)."""
    if catalog.is_manifest(cfg.prev_data):
        return load_manifest(cfg.prev_data)
    if cfg.prev_data:
        opts = config.DataConfig(**{**config.to_dict(cfg.data_opts),
                                    "tokenizer": base["tokenizer"]["path"]})
        return catalog.resolve(cfg.prev_data, cfg.cache_dir, model_cfg.seq_len,
                               model_cfg.vocab, opts)[1]
    if not base["manifest"]:
        raise config.ConfigError(
            f"prev_data: is required: the base {base_path} is a Hugging Face model, which "
            f"records no pretraining data; give data that shows what it knew (a source or "
            f"manifest) to measure forgetting on and replay from")
    return load_manifest(base["manifest"])


def run(cfg: FinetuneConfig) -> dict:
    """Finetune (or resume, or only evaluate a finished run); returns the final record."""
    inputs = _inputs(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runlock.acquire(run_dir):
        checkpoint.clean(run_dir)
        return _finetune(cfg, run_dir, inputs)


def _engines(cfg: FinetuneConfig, student: torch.nn.Module, teacher: torch.nn.Module,
             fast: fast_path.FastPath) -> tuple[Engine, torch.nn.Module]:
    """The student in its engine, and the teacher as that engine holds it (ZeRO-3
    partitions it too)."""
    if cfg.engine == "deepspeed":
        from forgetless import zero  # DeepSpeed is imported only where it is used

        return (zero.ZeroEngine(student, cfg.opt, cfg.deepspeed),
                zero.frozen(teacher, cfg.opt, cfg.deepspeed))
    return MegatronEngine(student, cfg.opt, cfg.parallel, fast), teacher


def _finetune(cfg: FinetuneConfig, run_dir: Path, inputs: Inputs) -> dict:
    """The run, with run_dir locked and cleaned."""
    base_path, base_hash, model_cfg = inputs.base_path, inputs.base_hash, inputs.model_cfg
    tokenizer, down, prev = inputs.tokenizer, inputs.down, inputs.prev
    teacher = with_precision(checkpoint.load_model(base_path)[0], cfg.opt.precision)
    teacher.requires_grad_(False)
    teacher.eval()
    fast = fast_path.resolve(cfg.parallel, model_cfg.seq_len, parallel.dp_size())
    student, _ = checkpoint.load_model(base_path, fast)
    if cfg.method == "lora":
        lora.apply(student, cfg.lora.rank, cfg.lora.alpha)
    engine, teacher = _engines(cfg, with_precision(student, cfg.opt.precision), teacher, fast)
    student = engine.model

    state = initial_state({"down": None, "replay": None})
    resume_from = checkpoint.resume_path(run_dir, cfg.resume)
    if resume_from is not None:
        saved = checkpoint.read_state(resume_from)
        checkpoint.check_model_config(resume_from, saved["model"], model_cfg.resolved())
        if saved.get("base_hash") != base_hash or saved.get("method") != cfg.method:
            raise checkpoint.CheckpointError(
                f"{run_dir} holds a finetune of another checkpoint or method "
                f"({saved.get('method')}); choose another run_dir")
        state = checkpoint.resume(resume_from, engine)
        if parallel.is_main():
            print(f"resuming from {resume_from} (step {state['step']})")

    n_replay = replay_rows(cfg)
    dp = dict(rank=parallel.dp_rank(), world=parallel.dp_size(),
              shuffle_window=cfg.data_opts.shuffle_window)
    down_rows = cfg.opt.batch_size - (n_replay if cfg.method == "replace" else 0)
    down_loader = Loader(StreamSpec(down, "train", down_rows, seed=cfg.seed, **dp),
                         cfg.data_opts.workers, state["data"]["down"])
    replay: Loader | OnTheFlyReplay | None = None
    if n_replay and cfg.replay.source == "onthefly":
        replay = OnTheFlyReplay(teacher, prev.domain_token, model_cfg.seq_len, n_replay,
                                cfg.replay.buffer_batches, cfg.replay.seed,
                                cfg.replay.sampling, state["data"]["replay"],
                                cfg.kernels)
    elif inputs.replay_source is not None:
        replay = Loader(StreamSpec(inputs.replay_source, "train", n_replay, seed=cfg.seed + 1,
                                   **dp), cfg.data_opts.workers, state["data"]["replay"])

    tokens_per_step = down_rows * model_cfg.seq_len  # the batch is global
    total_steps = step_budget(cfg.stop, tokens_per_step, 0, down.data["train"]["tokens"])
    rows = (cfg.opt.batch_size if cfg.method == "replace" else down_rows) // parallel.dp_size()
    if rows % cfg.parallel.microbatches:
        raise config.ConfigError(
            f"parallel.microbatches: {cfg.parallel.microbatches} does not divide the {rows} "
            f"rows each data-parallel rank takes of opt.batch_size")
    size = rows // cfg.parallel.microbatches
    if parallel.pp_size() > 1 and cfg.method != "replace" and n_replay // parallel.dp_size() % size:
        raise config.ConfigError(
            f"replay.batch_size: under pipeline parallelism each data-parallel rank's "
            f"{n_replay // parallel.dp_size()} replay rows must split into the {size}-row "
            f"microbatches of the downstream rows")

    eval_sets = {prefix: eval_set(manifest, cfg.opt.batch_size, cfg.eval.max_sequences)
                 for prefix, manifest in (("valid", down), ("prev", prev))}

    def eval_fn() -> dict:
        out = {}
        for prefix, batches in eval_sets.items():
            scores = evaluate(student, batches, teacher=teacher)
            out.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return out

    def checkpoint_state() -> dict:
        return {
            "config": config.to_dict(cfg), "model": model_cfg.resolved(),
            "tokenizer": {"path": str(tokenizer.path.resolve()), "hash": tokenizer.hash},
            "manifest": str(down.path.resolve()), "base_checkpoint": str(base_path.resolve()),
            "base_hash": base_hash, "method": cfg.method,
            "lora": config.to_dict(cfg.lora) if cfg.method == "lora" else None,
            **inputs.about,
        }

    training = Run(
        run_dir=run_dir, engine=engine,
        data=FinetuneBatches(down_loader, replay),
        plan=make_plan(cfg, teacher, size),
        eval_fn=eval_fn, opt=cfg.opt, stop=cfg.stop, eval=cfg.eval, ckpt=cfg.ckpt,
        tokens_per_step=tokens_per_step, total_steps=total_steps,
        checkpoint_state=checkpoint_state, preempt=cfg.preempt,
        flops_per_token=flops_per_token(model_cfg), about=inputs.about,
        **{k: state[k] for k in PROGRESS},
    )
    if parallel.is_main():
        print(f"finetuning {base_path} on {down.path} with {cfg.method}"
              + (f" (lam {cfg.lam}, {n_replay} {cfg.replay.source} replay rows/step)"
                 if n_replay else ""))
    return train(training, config.to_dict(cfg))
