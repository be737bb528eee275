"""Fused sampling from logits in Triton: one program per row streams its [vocab] logits in
blocks, applies the temperature and draws by Gumbel-max with the same Philox uniforms as the
PyTorch reference (`sampling.py`), so both pick the same token for the same (seed, sample id,
position). Top-k, top-p and min-p use thresholds found by bisection over the float ordering
(each step one pass over the row), never a sort. Seed, ids and positions are tensors, so a
CUDA-graph replay draws fresh numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (negatives reversed): bisection over floats."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unkey(k):
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _row_logits(row_ptr, offs, vocab, temperature):
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    return x / temperature


@triton.jit
def _bisect(row_ptr, vocab, temperature, lo, hi, goal, floor, top, total,
            MASS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key t in [lo, hi] with count (or probability mass) of {x >= t} >= goal,
    counting only x >= floor; mass is exp(x - top) / total."""
    for _ in range(33):
        mid = lo + (hi - lo + 1) // 2
        threshold = _unkey(mid.to(tl.int32))
        acc = tl.zeros((BLOCK,), tl.float32)  # per lane; one reduction per pass
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = _row_logits(row_ptr, offs, vocab, temperature)
            keep = (x >= threshold) & (x >= floor) & (offs < vocab)
            if MASS:
                acc += tl.where(keep, tl.exp(x - top), 0.0)
            else:
                acc += keep.to(tl.float32)
        mass = tl.sum(acc)
        if MASS:
            mass = mass / total
        ok = mass >= goal
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return _unkey(lo.to(tl.int32))


@triton.jit
def _floor_kernel(logits_ptr, stride, floor_ptr, vocab, temperature, top_k, top_p, min_p,
                  BLOCK: tl.constexpr):
    """Per row: the smallest tempered logit kept by top-k, then min-p, then top-p."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    floor = tl.full((), float("-inf"), tl.float32)
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, _row_logits(row_ptr, offs, vocab, temperature))
    top = tl.max(top)
    lo = _key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    hi = _key(top).to(tl.int64)
    if top_k > 0:
        floor = _bisect(row_ptr, vocab, temperature, lo, hi, top_k, floor, top, 1.0, False,
                        BLOCK)
    if min_p > 0.0:
        floor = tl.maximum(floor, top + tl.log(min_p))
    if top_p < 1.0:
        total = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = _row_logits(row_ptr, offs, vocab, temperature)
            total += tl.where((x >= floor) & (offs < vocab), tl.exp(x - top), 0.0)
        total = tl.sum(total)
        floor = _bisect(row_ptr, vocab, temperature, lo, hi, top_p, floor, top, total, True,
                        BLOCK)
    tl.store(floor_ptr + row, floor)


@triton.jit
def _gumbel_max_kernel(logits_ptr, stride, floor_ptr, seed_ptr, ids_ptr, pos_ptr, best_ptr,
                       index_ptr, vocab, span, temperature, BLOCK: tl.constexpr):
    """Program (row, part): the best Gumbel score and its index in vocab[part * span, ...)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    floor = tl.load(floor_ptr + row)
    seed = tl.load(seed_ptr)
    sample_id = tl.load(ids_ptr + row).to(tl.int64)
    position = tl.load(pos_ptr + row).to(tl.uint32)
    id_lo = (sample_id & 0xFFFFFFFF).to(tl.uint32)
    id_hi = (sample_id >> 32).to(tl.uint32)
    # running best per lane, reduced once at the end: a reduction per block would cost more
    # than the block's memory traffic
    lane_best = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_index = tl.full((BLOCK,), 0, tl.int32) + part * span
    end = tl.minimum(part * span + span, vocab)
    for start in range(part * span, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < end
        x = _row_logits(row_ptr, offs, end, temperature)
        # Philox call b gives the uniforms of vocab entries 4b .. 4b + 3
        blocks = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        zero = tl.zeros_like(blocks)
        a, b, c, d = tl.philox(seed, blocks, zero + position, zero + id_lo, zero + id_hi)
        bits = tl.interleave(tl.interleave(a, c), tl.interleave(b, d))
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # philox.uniform
        w = 1.0 - u  # -log(u) as sampling.exponential computes it
        e = tl.where(w < 1.0 / 256, w * (1.0 + w * (0.5 + w * (1.0 / 3.0))), -tl.log(u))
        score = tl.where(valid & (x >= floor), x - tl.log(e), float("-inf"))
        better = score > lane_best  # strict: a lane keeps its first (lowest) index on ties
        lane_index = tl.where(better, offs, lane_index)
        lane_best = tl.where(better, score, lane_best)
    best = tl.max(lane_best)
    # the lowest index among the best lanes, as torch.argmax picks
    best_index = tl.min(tl.where(lane_best == best, lane_index, 2147483647))
    tl.store(best_ptr + row * parts + part, best)
    tl.store(index_ptr + row * parts + part, best_index.to(tl.int64))


def sample(logits: torch.Tensor, seed: int | torch.Tensor, sample_ids: torch.Tensor,
           position: int | torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, block: int = 1024) -> torch.Tensor:
    """One token per row of logits [batch, vocab] (float32 or bfloat16); see sampling.sample.

    Rows are split into vocabulary parts sampled by separate programs (enough to fill the
    GPU), whose winners are compared at the end; filters first find each row's threshold."""
    if temperature == 0:
        return logits.float().argmax(-1)
    batch, vocab = logits.shape
    device = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    positions = torch.as_tensor(position, device=device).to(torch.int64).expand(batch)
    top_k = top_k if top_k < vocab else 0
    floor = torch.full((batch,), float("-inf"), device=device)
    if top_k or top_p < 1.0 or min_p > 0.0:
        _floor_kernel[(batch,)](logits, logits.stride(0), floor, vocab, float(temperature),
                                float(top_k), float(top_p), float(min_p), BLOCK=block)
    blocks = triton.cdiv(vocab, block)
    parts = max(1, min(blocks, triton.cdiv(8192, batch)))  # ~8192 programs fill a GPU
    span = triton.cdiv(blocks, parts) * block
    parts = triton.cdiv(vocab, span)
    best = torch.empty(batch, parts, device=device)
    index = torch.empty(batch, parts, dtype=torch.int64, device=device)
    _gumbel_max_kernel[(batch, parts)](logits, logits.stride(0), floor, seed,
                                       sample_ids.to(device).contiguous(), positions.contiguous(),
                                       best, index, vocab, span, float(temperature),
                                       BLOCK=block)
    return index.gather(1, best.argmax(1, keepdim=True)).squeeze(1)
