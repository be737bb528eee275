"""Peak memory per rank and tokens/s of a kl_pre finetune under each engine (not a test).

    .venv/bin/python benchmarks/memory.py [--hidden 1024 --layers 24 --steps 3 --nproc 2]

Pretrains a base of the given size for one step (random weights are enough: memory and speed
do not depend on them), then finetunes it with kl_pre (real replay) for --steps steps in each
mode on --nproc processes: megatron DP, megatron + distributed optimizer, ZeRO-2, ZeRO-3,
ZeRO-3 + CPU offload of optimizer and parameters. Each rank reports its peak resident memory
(ru_maxrss: the model builds, the steps and the final checkpoint save all count); on a GPU
machine the same table would be read from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "megatron DP": ["engine=megatron"],
    "megatron + distributed optimizer": ["engine=megatron",
                                         "parallel.distributed_optimizer=true"],
    "ZeRO-2": ["engine=deepspeed", "deepspeed.stage=2"],
    "ZeRO-3": ["engine=deepspeed", "deepspeed.stage=3"],
    "ZeRO-3 + offload": ["engine=deepspeed", "deepspeed.stage=3",
                         "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu"],
}


def _worker(out: Path, args: list[str]) -> None:
    """One rank of a finetune; writes its peak memory (GiB) to out/rank<RANK>.json."""
    from forgetless import config
    from forgetless.config import FinetuneConfig
    from forgetless.recipes import finetune

    finetune.run(config.load(FinetuneConfig, None, args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak": peak}))


def _base(root: Path, model: list[str]) -> Path:
    run_dir = root / "base"
    subprocess.run([sys.executable, "-m", "forgetless", "pretrain", f"run_dir={run_dir}",
                    *model, "data=stdlib-prose", "opt.batch_size=4", "stop.steps=1",
                    "eval.max_sequences=4", "threads=2"], check=True, stdout=subprocess.DEVNULL)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(Path(args.worker[0]), args.worker[1:])
    model = [f"model.hidden={args.hidden}", f"model.layers={args.layers}", "model.head_dim=64",
             "model.seq_len=128", "model.vocab=4096"]
    root = Path(tempfile.mkdtemp(prefix="forgetless-memory-"))
    base = _base(root, model)
    params = json.loads((base / "checkpoints" / "step_00000001" / "state.json").read_text())
    print(f"model: {params['params']:,} parameters; kl_pre, {args.nproc} ranks, batch 4 + "
          f"replay 2 rows of 128 tokens, float32\n")
    print("| mode | peak GiB per rank | vs megatron DP | tokens/s |")
    print("| --- | --- | --- | --- |")
    first = None
    for name, mode in MODES.items():
        out = root / name.replace(" ", "_").replace("+", "")
        out.mkdir()
        run = [f"run_dir={out / 'run'}", f"checkpoint={base}", "data=stdlib-code",
               "method=kl_pre", "replay.source=real", "replay.batch_size=2", "opt.batch_size=4",
               "stop.tokens=null", f"stop.steps={args.steps}", "eval.interval=1000",
               "eval.log_interval=1", "eval.max_sequences=4", "threads=1", *mode]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.nproc}", __file__, "--worker", str(out), *run],
                       check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        peak = max(json.loads(p.read_text())["peak"] for p in out.glob("rank*.json"))
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
        speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1]
        first = first or peak
        print(f"| {name} | {peak:.2f} | {peak / first:.2f} | {speed:.0f} |  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
