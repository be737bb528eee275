"""Pretraining throughput: tokens/s and model FLOPs utilisation for the whole training step
(data loading, forward, backward, optimizer) at the reference config, the bytes of shards
and indexes each rank's loader reads per step, and the start-up time (from the imports to
the end of the first step).

    python benchmarks/throughput.py [--steps 30] [--profile] [key=value ...]
    torchrun --nproc_per_node 2 benchmarks/throughput.py parallel.tp=2 threads=1

Under torchrun each rank measures its own share; tokens/s counts the global batch.

MFU is against --peak-tflops, or, by default, the measured float32 matmul rate of this machine.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports: start-up includes them

import argparse  # noqa: E402

import torch  # noqa: E402

from forgetless import config, fast_path, parallel  # noqa: E402
from forgetless.config import PretrainConfig  # noqa: E402
from forgetless.data import catalog  # noqa: E402
from forgetless.data.loader import Loader, StreamSpec  # noqa: E402
from forgetless.engine import MegatronEngine  # noqa: E402
from forgetless.model import build_model, flops_per_token, init_weights  # noqa: E402
from forgetless.recipes.pretrain import make_plan  # noqa: E402
from forgetless.train import Run, train_step  # noqa: E402

REFERENCE = ["model.hidden=128", "model.layers=4", "model.head_dim=32", "model.seq_len=128",
             "model.vocab=4096", "opt.batch_size=32", "data=stdlib-prose"]


def matmul_peak_tflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (>= 1)")
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config.load(PretrainConfig, None, REFERENCE + args.overrides)
    parallel.init(cfg.seed, cfg.threads, cfg.parallel.tp, cfg.parallel.pp)
    _, manifest = catalog.resolve(cfg.data, cfg.cache_dir, cfg.model.seq_len, cfg.model.vocab,
                                  cfg.data_opts)
    fast = fast_path.resolve(cfg.parallel, cfg.model.seq_len, parallel.dp_size())
    model = build_model(cfg.model, fast, initialise=False)
    init_weights(model, cfg.model, cfg.seed)
    engine = MegatronEngine(model, cfg.opt, cfg.parallel, fast)
    loader = Loader(StreamSpec(manifest, "train", cfg.opt.batch_size, seed=cfg.seed,
                               rank=parallel.dp_rank(), world=parallel.dp_size(),
                               shuffle_window=cfg.data_opts.shuffle_window),
                    cfg.data_opts.workers)
    rows = cfg.opt.batch_size // parallel.dp_size()
    run = Run(run_dir=None, engine=engine, data=loader,
              plan=make_plan(rows // cfg.parallel.microbatches),
              eval_fn=dict, opt=cfg.opt, stop=cfg.stop, eval=cfg.eval, ckpt=cfg.ckpt,
              tokens_per_step=cfg.opt.batch_size * cfg.model.seq_len, total_steps=None,
              checkpoint_state=dict, preempt=cfg.preempt)
    train_step(run, next(loader))
    startup = time.perf_counter() - STARTED
    for _ in range(args.warmup - 1):
        train_step(run, next(loader))
    start, read = time.perf_counter(), loader.bytes_read
    for _ in range(args.steps):
        train_step(run, next(loader))
    seconds = time.perf_counter() - start
    per_step = (loader.bytes_read - read) / args.steps
    tokens_per_s = args.steps * run.tokens_per_step / seconds
    peak = (args.peak_tflops or matmul_peak_tflops()) * parallel.world_size()  # all ranks
    achieved = tokens_per_s * flops_per_token(cfg.model) / 1e12
    if not parallel.is_main():
        return
    print(f"world {parallel.world_size()} tp {parallel.tp_size()} pp {parallel.pp_size()}  "
          f"threads/rank {torch.get_num_threads()}  step {seconds / args.steps * 1e3:.0f} ms  "
          f"tokens/s {tokens_per_s:,.0f}  model {achieved:.3f} TFLOP/s  "
          f"peak {peak:.3f} TFLOP/s  MFU {achieved / peak:.1%}  "
          f"read/rank/step {per_step / 1e3:,.1f} kB  start-up {startup:.1f} s")
    if args.profile and parallel.world_size() == 1:
        with torch.profiler.profile() as prof:
            for _ in range(5):
                train_step(run, next(loader))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
