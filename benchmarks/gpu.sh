#!/usr/bin/env bash
# One GPU session: the kernel benchmark with its correctness checks, then a small end-to-end
# run on CUDA (pretrain, generate and finetune with kernels.backend=triton and =torch, same
# tokens and losses expected), then pretraining MFU of a ~310M model (bf16, seq 2048) with
# and without the fast path's fusions. Writes $OUT/benchmarks.md, $OUT/e2e.txt, $OUT/mfu.txt.
#   bash benchmarks/gpu.sh OUT_DIR          (wheels for missing packages in .whl/, if any)
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
repo=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
# the package layout that pyproject.toml maps (no install: the card's own torch stays)
pkg=/tmp/pkg
rm -rf "$pkg" && mkdir -p "$pkg/forgetless"
cp -r forgetless/. "$pkg/forgetless/"
for sub in data kernels recipes launch; do cp -r "$sub" "$pkg/forgetless/$sub"; done
cp -r recipes "$pkg/recipes"
export PYTHONPATH=/tmp/site:$pkg PYTHONUNBUFFERED=1 FORGETLESS_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
    timeout 300 python3 benchmarks/kernels.py --out "$out/benchmarks.md" 2>&1 | tail -40
fi
cd /tmp  # the repository's own forgetless/ would shadow the mapped package

run() { echo "\$ forgetless $*"; timeout 240 python3 -m forgetless "$@" 2>&1 | grep -v "it/s\]\|step/s\]\|tok/s\]" | tail -6; }
[ -n "${SKIP_E2E:-}" ] && exit 0
r=/tmp/e2e
{
    tiny="model.hidden=256 model.layers=4 model.head_dim=64 model.seq_len=256 model.vocab=4096"
    run pretrain run_dir=$r/pre $tiny stop.tokens=null stop.steps=60 eval.interval=60 \
        opt.batch_size=32 threads=8
    for backend in triton torch; do
        run generate checkpoint=$r/pre out=$r/replay-$backend samples=256 batch_size=128 \
            kernels.backend=$backend
        run finetune checkpoint=$r/pre run_dir=$r/ft-$backend method=kl_pre replay.source=self \
            replay.data=$r/replay-$backend stop.tokens=null stop.steps=10 eval.interval=5 \
            eval.log_interval=1 kernels.backend=$backend
    done
    python3 - <<'EOF'
import json, numpy as np, pathlib
from forgetless.data import shards
from forgetless.data.samples import read_split
r = pathlib.Path("/tmp/e2e")
tok = {b: read_split(shards.load_manifest(r / f"replay-{b}"), "train")
       for b in ("triton", "torch")}
print("replay tokens equal (triton vs torch):", (tok["triton"] == tok["torch"]).mean())
logs = {b: [json.loads(l) for l in open(r / f"ft-{b}/metrics.jsonl")] for b in tok}
for a, b in zip(*logs.values()):
    keys = [k for k in ("train_loss", "reg_loss", "prev_kl", "valid_ntp") if k in a]
    print(a["step"], {k: (round(a[k], 6), round(b[k], 6)) for k in keys})
EOF
    python3 - <<'EOF'
import time, torch
from forgetless import checkpoint, parallel
from forgetless.sampler import generate
parallel.init(0)
model, state = checkpoint.load_model(checkpoint.resolve("/tmp/e2e/pre"))
seq = state["model"]["seq_len"]
runs = {"triton, CUDA graph": dict(backend="triton"),
        "triton, eager steps": dict(backend="triton", cuda_graph=False),
        "torch sampler, eager steps": dict(backend="torch")}
for batch in (1, 64):
    ids = torch.arange(batch)
    out = {}
    for name, kw in runs.items():
        out[name] = generate(model, 3, ids, seq, 0, **kw)
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, 3, ids, seq, 0, **kw)
        torch.cuda.synchronize()
        print(f"generate batch {batch} x {seq} ({name}): "
              f"{batch * seq / (time.perf_counter() - start):,.0f} tokens/s")
    first = out["triton, CUDA graph"]
    print("  tokens equal to the graph's:", {k: (v == first).float().mean().item()
                                           for k, v in out.items()})
EOF
} 2>&1 | tee "$out/e2e.txt"
[ -n "${SKIP_MFU:-}" ] && exit 0
{
    # hidden 1024, 24 layers, 16 heads, SwiGLU 2752, vocab 4096: 312M parameters
    size="model.hidden=1024 model.layers=24 model.head_dim=64 model.seq_len=2048 \
        model.vocab=4096 opt.batch_size=8 opt.precision=bf16"
    for fusions in off on; do
        echo "parallel.fusions=$fusions (SDPA attention either way)"
        # shellcheck disable=SC2086
        timeout 300 python3 "$repo/benchmarks/throughput.py" --steps 10 --peak-tflops 989 \
            $size parallel.fusions=$fusions 2>&1 | grep "tokens/s"
    done
} 2>&1 | tee "$out/mfu.txt"
