"""Kernel benchmark: fused sampling and fused KL / cross-entropy against their PyTorch
references (eager and torch.compile), with achieved memory bandwidth; on CUDA also against
the card's measured device-to-device copy bandwidth and the peak memory of the fused linear
loss. On CPU the Triton kernels would only run in the interpreter, so only the PyTorch paths
are timed (at small sizes).

    python benchmarks/kernels.py [--out FILE.md] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from forgetless.kernels import losses, sampling

CUDA = torch.cuda.is_available()
if CUDA:
    from forgetless.kernels import sampling_triton


def timed(fn, repeats: int = 10) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x))


def sampling_rows(device: str, batch: int, vocab: int, dtype: torch.dtype) -> list[tuple]:
    logits = torch.randn(batch, vocab, device=device).to(dtype)
    ids = torch.arange(batch, device=device)
    moved = logits.numel() * logits.element_size()
    compiled = torch.compile(sampling.sample)
    rows = []
    paths = {"torch eager (Gumbel-max, Philox)": lambda: sampling.sample(logits, 1, ids, 3),
             "torch.compile": lambda: compiled(logits, 1, ids, 3),
             "softmax + multinomial": lambda: torch.multinomial(
                 torch.softmax(logits.float(), -1), 1)}
    if CUDA:
        paths["triton fused"] = lambda: sampling_triton.sample(logits, 1, ids, 3)
        paths["triton fused, top_k=50 top_p=0.9"] = lambda: sampling_triton.sample(
            logits, 1, ids, 3, top_k=50, top_p=0.9)
    for name, fn in paths.items():
        try:
            seconds = timed(fn)
            rows.append((f"sample {batch}x{vocab} {str(dtype)[6:]}", name, seconds * 1e3,
                         moved / seconds / 1e9))
        except Exception as e:  # a path that cannot run here is reported, not fatal
            rows.append((f"sample {batch}x{vocab} {str(dtype)[6:]}", f"{name}: {e!r:.60}",
                         float("nan"), float("nan")))
    return rows


def hidden_sampling_rows(device: str, batch: int, width: int, vocab: int,
                         dtype: torch.dtype) -> list[tuple]:
    """Sampling from hidden states [batch, width] under an output embedding [vocab, width]:
    projection then sampling, against the Triton kernel that never writes the logits.
    GB/s counts the embedding and hidden states read once."""
    hidden = torch.randn(batch, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width**0.5).to(dtype)
    ids = torch.arange(batch, device=device)
    moved = (weight.numel() + hidden.numel()) * weight.element_size()
    paths = {"matmul + torch eager sample": lambda: sampling.sample(hidden @ weight.t(), 1, ids,
                                                                    3)}
    if CUDA:
        paths["matmul + triton fused sample"] = lambda: sampling_triton.sample(
            hidden @ weight.t(), 1, ids, 3)
        paths["triton from hidden states"] = lambda: sampling_triton.sample_hidden(
            hidden, weight, 1, ids, 3)
    case = f"sample from hidden {batch}x{width}->{vocab} {str(dtype)[6:]}"
    seconds = {name: timed(fn) for name, fn in paths.items()}
    return [(case, name, s * 1e3, moved / s / 1e9) for name, s in seconds.items()]


def kl_rows(device: str, tokens: int, vocab: int) -> list[tuple]:
    s = torch.randn(tokens, vocab, device=device, requires_grad=True)
    t = torch.randn(tokens, vocab, device=device)
    y = torch.randint(0, vocab, (tokens,), device=device)
    moved = 5 * s.numel() * 4  # forward reads s, t; backward reads s, t and writes the grad

    def step(fn):
        def run():
            kl, ce = fn(s, t, y)
            (kl.sum() + ce.sum()).backward()
            s.grad = None
        return run

    paths = {"torch eager": losses.reference, "torch.compile": torch.compile(losses.reference)}
    if CUDA:
        paths["triton fused"] = losses.kl_ce
    rows = []
    for name, fn in paths.items():
        seconds = timed(step(fn), repeats=5)
        rows.append((f"KL+CE fwd+bwd {tokens}x{vocab}", name, seconds * 1e3,
                     moved / seconds / 1e9))
    return rows


def fused_linear_memory(tokens: int, hidden: int, vocab: int) -> list[tuple]:
    """Peak CUDA memory of the loss step: logits materialised vs fused in chunks."""
    dtype = torch.bfloat16
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", dtype=dtype, requires_grad=True)
    th, tw = torch.randn_like(h), torch.randn_like(w)
    y = torch.randint(0, vocab, (tokens,), device="cuda")

    def unfused():
        kl, ce = losses.reference(h @ w.t(), th @ tw.t(), y)
        (kl.mean() + ce.mean()).backward()

    def fused():
        loss, _, _ = losses.fused_linear_kl_ce(h, w, th, tw, y, chunk=2048)
        loss.backward()

    rows = []
    for name, fn in (("unfused (logits in memory)", unfused), ("fused linear, chunk 2048", fused)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        h.grad = w.grad = None
        rows.append((f"linear KL+CE {tokens}x{hidden}->{vocab} bf16", name, seconds * 1e3, peak))
    return rows


def gpu_checks() -> list[str]:
    """The kernels against the references on this GPU, at benchmark sizes."""
    out = []
    logits = torch.randn(256, 131072, device="cuda") * 2
    ids = torch.arange(256, device="cuda") * 7919
    for settings in ({}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}):
        same = sum((sampling.sample(logits, 5, ids, p, **settings)
                    == sampling_triton.sample(logits, 5, ids, p, **settings)).sum().item()
                   for p in range(4))
        out.append(f"sampling {settings or 'plain'}: {same}/{4 * 256} tokens equal to the "
                   f"PyTorch reference")
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(256, 2048, device="cuda").to(dtype)
        weight = (torch.randn(131072, 2048, device="cuda") / 45).to(dtype)
        same = sum((sampling.sample(hidden @ weight.t(), 5, ids, p)
                    == sampling_triton.sample_hidden(hidden, weight, 5, ids, p)).sum().item()
                   for p in range(4))
        out.append(f"sampling from hidden states {str(dtype)[6:]}: {same}/{4 * 256} tokens "
                   f"equal to projection + PyTorch reference")
    s = (torch.randn(64, 131072, device="cuda") * 3).requires_grad_(True)
    t = torch.randn(64, 131072, device="cuda") * 3
    y = torch.randint(0, 131072, (64,), device="cuda")
    kl, ce = losses.kl_ce(s, t, y)
    (kl.sum() + ce.sum()).backward()
    s64 = s.detach().double().requires_grad_(True)
    rkl, rce = losses.reference(s64, t.double(), y)
    (rkl.sum() + rce.sum()).backward()
    out.append(f"KL/CE vs float64: max |dKL| {(kl.double() - rkl).abs().max().item():.2e}, "
               f"|dCE| {(ce.double() - rce).abs().max().item():.2e}, "
               f"|dgrad| {(s.grad.double() - s64.grad).abs().max().item():.2e}")
    zero, _ = losses.kl_ce(t, t, y)
    out.append(f"KL of equal inputs: {zero.abs().max().item()}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="")
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    device = "cuda" if CUDA else "cpu"
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    lines = [f"# Kernel benchmark on {name}", ""]
    if CUDA:
        lines.append(f"Device-to-device copy bandwidth: {copy_bandwidth(device) / 1e9:,.0f} GB/s")
        lines += ["", *[f"- {check}" for check in gpu_checks()], ""]
    big = CUDA and not args.quick
    rows = sampling_rows(device, 256, 131072 if big else 4096, torch.float32)
    if CUDA:
        rows += sampling_rows(device, 256, 131072 if big else 4096, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16) if CUDA else (torch.float32,):
        rows += hidden_sampling_rows(device, 256 if big else 64, 2048 if big else 128,
                                     131072 if big else 4096, dtype)
    rows += kl_rows(device, 4096 if big else 256, 131072 if big else 4096)
    lines += ["| case | path | ms | GB/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {p} | {ms:.3f} | {bw:,.1f} |" for c, p, ms, bw in rows]
    if big:
        lines += ["", "| case | path | ms | peak GiB |", "| --- | --- | --- | --- |"]
        lines += [f"| {c} | {p} | {ms:.1f} | {gib:.2f} |"
                  for c, p, ms, gib in fused_linear_memory(16384, 2048, 131072)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
