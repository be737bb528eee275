"""Hugging Face conversion and generation, timed on this machine (not a test).

    python benchmarks/convert.py [--hidden 1024 --layers 24 ...] [--gen-batch 64]

Conversion: a random Llama-shaped model (default ~350M parameters, float32) saved by
transformers, then imported into the megatron model (`hf.load_weights`: per-tensor slices read
through safetensors) and exported back (`hf.hf_state_dict` + `hf.save_weights`), each phase in
its own process so its peak resident memory is its own. Generation: forgetless's KV-cache
sampler against transformers' `generate` on the same weights (the reference config as a Llama,
batch 64, full-length samples, torch backend on the CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers


def _make(args: argparse.Namespace, out: Path) -> dict:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.groups, max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _import(path: Path) -> tuple[torch.nn.Module, object]:
    from forgetless import hf, parallel
    from forgetless.model import build_model

    parallel.init(0)
    cfg = hf.model_config(path)
    model = build_model(cfg, initialise=False)
    hf.load_weights(model, path)
    return model, cfg


def _phase(name: str, path: Path) -> dict:
    """One timed phase in this process: import, or import then export."""
    from forgetless import hf

    start = time.perf_counter()
    model, cfg = _import(path)
    seconds = {"import_s": time.perf_counter() - start}
    if name == "export":
        out = path.parent / "exported"
        out.mkdir(exist_ok=True)
        start = time.perf_counter()
        hf.save_weights(hf.hf_state_dict(model, cfg), out, "2GB")
        seconds = {"export_s": time.perf_counter() - start}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {**seconds, "peak_rss_gib": round(peak, 2)}


def _subprocess(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generation(args: argparse.Namespace, path: Path) -> dict:
    from forgetless.sampler import generate

    _make(argparse.Namespace(**{**vars(args), "vocab": 4096, "hidden": 128, "ffn": 384,
                                "layers": 4, "heads": 4, "groups": 4}), path)
    model, _ = _import(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    batch, seq_len = args.gen_batch, args.seq_len
    _sample_both(model, reference, 2, 8)  # warm-up: first-call costs are not throughput
    start = time.perf_counter()
    generate(model, 1, torch.arange(batch), seq_len, seed=0)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    _sample_hf(reference, batch, seq_len)
    theirs = time.perf_counter() - start
    tokens = batch * (seq_len - 1)
    return {"forgetless_tokens_per_s": round(tokens / ours), "transformers_tokens_per_s":
            round(tokens / theirs), "ratio": round(theirs / ours, 2)}


def _sample_both(model, reference, batch: int, seq_len: int) -> None:
    from forgetless.sampler import generate

    generate(model, 1, torch.arange(batch), seq_len, seed=0)
    _sample_hf(reference, batch, seq_len)


def _sample_hf(reference, batch: int, seq_len: int) -> None:
    """transformers' ancestral sampling from token 1 to the full length (batch x seq_len)."""
    start_tokens = torch.ones(batch, 1, dtype=torch.long)
    with torch.no_grad():
        reference.generate(start_tokens, attention_mask=torch.ones_like(start_tokens),
                           pad_token_id=0, do_sample=True, max_new_tokens=seq_len - 1,
                           min_new_tokens=seq_len - 1, top_k=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--phase", choices=("make", "import", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "make":
        print(json.dumps(_make(args, args.dir)))
        return
    if args.phase:
        print(json.dumps(_phase(args.phase, args.dir)))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        sizes = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "heads", "groups",
                                                        "ffn", "vocab")]
        made = _subprocess("--phase", "make", "--dir", str(model_dir), *sizes)
        size_gib = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30
        print(f"model: {made['parameters'] / 1e6:.0f}M parameters, {size_gib:.2f} GiB float32")
        print("import:", _subprocess("--phase", "import", "--dir", str(model_dir)))
        print("export:", _subprocess("--phase", "export", "--dir", str(model_dir)))
        print("generation:", _generation(args, Path(tmp) / "small"))


if __name__ == "__main__":
    main()
