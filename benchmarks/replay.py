"""Replay throughput at the reference config: generation tokens/s (KV-cache ancestral
sampling, batch 64) and finetuning downstream tokens/s for `none`, `kl_pre` from replay
shards and `kl_pre` with replay sampled on the fly (buffer 8 batches; downstream batch 32,
replay batch 16), timed in one process.

    python benchmarks/replay.py CHECKPOINT REPLAY_MANIFEST [--rounds 5] [key=value ...]

CHECKPOINT is a pretrained reference-config run (e.g. runs/quickstart/pretrain) and
REPLAY_MANIFEST the output of `forgetless generate` for it (e.g. runs/quickstart/replay).
"""

from __future__ import annotations

import argparse
import time

import torch

from forgetless import checkpoint, config, parallel
from forgetless.config import FinetuneConfig
from forgetless.data import catalog
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import load_manifest
from forgetless.engine import MegatronEngine
from forgetless.model import with_precision
from forgetless.recipes.finetune import FinetuneBatches, OnTheFlyReplay, make_plan
from forgetless.sampler import generate
from forgetless.train import Run, train_step


def _finetune_run(cfg: FinetuneConfig, down, replay_manifest, first_token: int) -> Run:
    ckpt = checkpoint.resolve(cfg.checkpoint)
    student, state = checkpoint.load_model(ckpt)
    teacher = with_precision(checkpoint.load_model(ckpt)[0], cfg.opt.precision)
    teacher.requires_grad_(False)
    replay = None
    if cfg.method != "none" and cfg.replay.source == "onthefly":
        replay = OnTheFlyReplay(teacher, first_token, state["model"]["seq_len"],
                                cfg.replay.batch_size, cfg.replay.buffer_batches,
                                cfg.replay.seed, cfg.replay.sampling, None, cfg.kernels)
    elif cfg.method != "none":
        replay = Loader(StreamSpec(replay_manifest, "train", cfg.replay.batch_size))
    data = FinetuneBatches(Loader(StreamSpec(down, "train", cfg.opt.batch_size)), replay)
    engine = MegatronEngine(with_precision(student, cfg.opt.precision), cfg.opt, cfg.parallel)
    run = Run(run_dir=None, engine=engine, data=data,
              plan=make_plan(cfg, teacher, cfg.opt.batch_size), eval_fn=dict, opt=cfg.opt,
              stop=cfg.stop, eval=cfg.eval, ckpt=cfg.ckpt, tokens_per_step=0, total_steps=None,
              checkpoint_state=dict, preempt=cfg.preempt)
    for _ in range(cfg.replay.buffer_batches):  # a whole on-the-fly buffer: the first one
        train_step(run, next(data))
    return run


def _seconds_per_step(run: Run, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run, next(run.data))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("replay")
    parser.add_argument("--steps", type=int, default=8,
                        help="finetuning steps per round (a multiple of the on-the-fly buffer)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="generation batch")
    parser.add_argument("overrides", nargs="*", help="finetune key=value, e.g. opt.precision=bf16")
    args = parser.parse_intermixed_args()
    parallel.init(0)
    ckpt = checkpoint.resolve(args.checkpoint)
    model, state = checkpoint.load_model(ckpt)
    first = load_manifest(state["manifest"]).domain_token
    ids = torch.arange(args.batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(model, first, ids, state["model"]["seq_len"], seed=0)
        times.append(time.perf_counter() - start)
    gen = args.batch * state["model"]["seq_len"] / sorted(times)[1]
    print(f"generation: batch {args.batch}, {gen:,.0f} tokens/s (median of 3)")

    base = config.load(FinetuneConfig, None, [f"checkpoint={args.checkpoint}",
                                              "opt.batch_size=32", "replay.batch_size=16"])
    opts = config.DataConfig(tokenizer=state["tokenizer"]["path"])
    _, down = catalog.resolve(base.data, base.cache_dir, state["model"]["seq_len"],
                              state["model"]["vocab"], opts)
    replay = load_manifest(args.replay)
    replay_from = {"none": [], "kl_pre": ["replay.source=self", f"replay.data={args.replay}"],
                   "kl_pre onthefly": ["replay.source=onthefly", "replay.buffer_batches=8"]}
    runs = {name: _finetune_run(config.load(FinetuneConfig, None, [
        f"checkpoint={args.checkpoint}", f"method={name.split()[0]}", "opt.batch_size=32",
        *(["replay.batch_size=16"] if extra else []), *extra, *args.overrides]), down, replay,
        first) for name, extra in replay_from.items()}
    # alternate the two in rounds so that load on the machine affects both alike
    times: dict[str, list[float]] = {method: [] for method in runs}
    for _ in range(args.rounds):
        for method, run in runs.items():
            times[method].append(_seconds_per_step(run, args.steps))
    seq_len = state["model"]["seq_len"]
    speeds = {m: 32 * seq_len / sorted(t)[len(t) // 2] for m, t in times.items()}
    for method, speed in speeds.items():
        print(f"finetune {method}: {speed:,.0f} downstream tokens/s (median of {args.rounds})")
    for name in ("kl_pre", "kl_pre onthefly"):
        print(f"{name} keeps {speeds[name] / speeds['none']:.0%} of none's speed")


if __name__ == "__main__":
    main()
