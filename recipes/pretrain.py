"""`forgetless pretrain`: train a GPT from scratch on token shards."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from forgetless import checkpoint, config, fast_path, parallel, runlock
from forgetless.config import ConfigError, PretrainConfig
from forgetless.data import catalog
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import Manifest
from forgetless.data.tokenizer import Tokenizer
from forgetless.engine import MegatronEngine
from forgetless.evaluation import eval_set, evaluate
from forgetless.model import (
    build_model,
    count_params,
    flops_per_token,
    init_weights,
    with_precision,
)
from forgetless.schedule import Micro, mean_share, split
from forgetless.train import PROGRESS, Run, initial_state, step_budget, train


def make_plan(size: int) -> Callable[[torch.Tensor], list[Micro]]:
    """This rank's rows in microbatches of `size`, each a share of the mean next-token loss."""

    def plan(batch: torch.Tensor) -> list[Micro]:
        chunks = split(batch, size)
        n = len(chunks)
        return [Micro(chunk, partial(mean_share, weight=1.0, n=n)) for chunk in chunks]

    return plan


def run(cfg: PretrainConfig) -> dict:
    """Pretrain (or resume, or only evaluate a finished run); returns the final record."""
    parallel.init(cfg.seed, cfg.threads, cfg.parallel.tp, cfg.parallel.pp)
    tokenizer, manifest = catalog.resolve(cfg.data, cfg.cache_dir, cfg.model.seq_len,
                                          cfg.model.vocab, cfg.data_opts)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runlock.acquire(run_dir):
        checkpoint.clean(run_dir)
        return _pretrain(cfg, run_dir, tokenizer, manifest)


def _entropy(manifest: Manifest) -> str:
    entropy = manifest.unigram_entropy
    return "n/a" if entropy is None else f"{entropy:.3f} nats"


def _pretrain(cfg: PretrainConfig, run_dir: Path, tokenizer: Tokenizer,
              manifest: Manifest) -> dict:
    """The run, with run_dir locked and cleaned."""
    fast = fast_path.resolve(cfg.parallel, cfg.model.seq_len, parallel.dp_size())
    model = build_model(cfg.model, fast, initialise=False)
    init_weights(model, cfg.model, cfg.seed)
    engine = MegatronEngine(with_precision(model, cfg.opt.precision), cfg.opt, cfg.parallel,
                            fast)
    model = engine.model
    tokens_per_step = cfg.opt.batch_size * cfg.model.seq_len  # the batch is global
    n_params = count_params(cfg.model, exclude_embeddings=True)
    total_steps = step_budget(cfg.stop, tokens_per_step, n_params,
                              manifest.data["train"]["tokens"])
    if total_steps is None and cfg.opt.schedule == "cosine":
        raise ConfigError("opt.schedule: cosine needs a step budget (stop.tokens, "
                          "stop.tokens_per_param, stop.epochs or stop.steps)")

    state = initial_state()
    resume_from = checkpoint.resume_path(run_dir, cfg.resume)
    if resume_from is not None:
        saved = checkpoint.read_state(resume_from)
        checkpoint.check_model_config(resume_from, saved["model"], cfg.model.resolved())
        state = checkpoint.resume(resume_from, engine)
        if parallel.is_main():
            print(f"resuming from {resume_from} (step {state['step']})")
    if state["finished"] and total_steps is not None and state["step"] < total_steps:
        state["finished"] = False  # the budget was raised: keep training

    spec = StreamSpec(manifest, "train", cfg.opt.batch_size, seed=cfg.seed,
                      rank=parallel.dp_rank(), world=parallel.dp_size(),
                      shuffle_window=cfg.data_opts.shuffle_window)
    loader = Loader(spec, cfg.data_opts.workers, state["data"])

    rows = cfg.opt.batch_size // parallel.dp_size()
    if rows % cfg.parallel.microbatches:
        raise ConfigError(f"parallel.microbatches: {cfg.parallel.microbatches} does not divide "
                          f"the {rows} rows each data-parallel rank takes of opt.batch_size")
    plan = make_plan(rows // cfg.parallel.microbatches)

    valid = eval_set(manifest, cfg.opt.batch_size, cfg.eval.max_sequences)

    def eval_fn() -> dict:
        scores = evaluate(model, valid)
        return {f"valid_{k}": v for k, v in scores.items()}

    def checkpoint_state() -> dict:
        return {
            "config": config.to_dict(cfg),
            "model": cfg.model.resolved(),
            "tokenizer": {"path": str(tokenizer.path.resolve()), "hash": tokenizer.hash},
            "manifest": str(manifest.path.resolve()),
            "params": count_params(cfg.model),
            "params_non_embedding": n_params,
        }

    training = Run(
        run_dir=run_dir, engine=engine, data=loader, plan=plan,
        eval_fn=eval_fn, opt=cfg.opt, stop=cfg.stop, eval=cfg.eval, ckpt=cfg.ckpt,
        tokens_per_step=tokens_per_step, total_steps=total_steps,
        checkpoint_state=checkpoint_state, preempt=cfg.preempt,
        flops_per_token=flops_per_token(cfg.model),
        **{k: state[k] for k in PROGRESS},
    )
    if parallel.is_main():
        print(f"model: {count_params(cfg.model):,} parameters ({n_params:,} without embeddings); "
              f"data: {manifest.path} ({manifest.data['train']['tokens']:,} train tokens, "
              f"unigram entropy {_entropy(manifest)})")
    final = train(training, config.to_dict(cfg))
    final["unigram_entropy"] = manifest.unigram_entropy
    return final
