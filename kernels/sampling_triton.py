"""Fused sampling from logits in Triton: one program per row streams its [vocab] logits in
blocks, applies the temperature and draws by Gumbel-max with the same Philox uniforms as the
PyTorch reference (`sampling.py`), so both pick the same token for the same (seed, sample id,
position). Top-k, top-p and min-p use thresholds found by bisection over the float ordering
(each step one pass over the row), never a sort. Seed, ids and positions are tensors, so a
CUDA-graph replay draws fresh numbers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forgetless.kernels.sampling import filtered


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
def _gumbel(seed, c0, c1, c2, c3):
    """Gumbel noise for the vocab entries of Philox calls c0 (call b gives entries 4b .. 4b + 3
    along the last axis), drawn exactly as the PyTorch reference draws it."""
    a, b, c, d = tl.philox(seed, c0, c1, c2, c3)
    bits = tl.interleave(tl.interleave(a, c), tl.interleave(b, d))
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # philox.uniform
    w = 1.0 - u  # -log(u) as sampling.exponential computes it
    e = tl.where(w < 1.0 / 256, w * (1.0 + w * (0.5 + w * (1.0 / 3.0))), -tl.log(u))
    return -tl.log(e)


@triton.jit
def _keep_best(score, offs, lane_best, lane_index):
    """Per lane, the best score so far and its index (strict: the first, lowest index on ties).
    One reduction at the end of a program instead of one per block, which would cost more
    than the block's memory traffic."""
    better = score > lane_best
    return tl.where(better, score, lane_best), tl.where(better, offs, lane_index)


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
    lane_best = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_index = tl.full((BLOCK,), 0, tl.int32) + part * span
    end = tl.minimum(part * span + span, vocab)
    for start in range(part * span, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _row_logits(row_ptr, offs, end, temperature)
        blocks = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        zero = tl.zeros_like(blocks)
        noise = _gumbel(seed, blocks, zero + position, zero + id_lo, zero + id_hi)
        score = tl.where((offs < end) & (x >= floor), x + noise, float("-inf"))
        lane_best, lane_index = _keep_best(score, offs, lane_best, lane_index)
    best = tl.max(lane_best)
    best_index = tl.min(tl.where(lane_best == best, lane_index, 2147483647))  # as torch.argmax
    tl.store(best_ptr + row * parts + part, best)
    tl.store(index_ptr + row * parts + part, best_index.to(tl.int64))


@triton.jit
def _hidden_gumbel_max_kernel(h_ptr, w_ptr, seed_ptr, ids_ptr, pos_ptr, best_ptr, index_ptr,
                              batch, vocab, hidden, span, temperature, FP32: tl.constexpr,
                              UPCAST: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                              BLOCK_H: tl.constexpr):
    """Program (row block, part): for BLOCK_B rows, the best Gumbel score over vocab[part *
    span, ...) and its index, the logits made tile by tile from hidden states [batch, hidden]
    and the output embedding [vocab, hidden] (both contiguous) and never stored."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    row_ok = rows < batch
    seed = tl.load(seed_ptr)
    sample_id = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    zero = tl.zeros((BLOCK_B, BLOCK_V // 4), tl.uint32)
    position = zero + tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.uint32)[:, None]
    id_lo = zero + (sample_id & 0xFFFFFFFF).to(tl.uint32)[:, None]
    id_hi = zero + (sample_id >> 32).to(tl.uint32)[:, None]
    lane_best = tl.full((BLOCK_B, BLOCK_V), float("-inf"), tl.float32)
    lane_index = tl.full((BLOCK_B, BLOCK_V), 0, tl.int32) + part * span
    end = tl.minimum(part * span + span, vocab)
    for start in range(part * span, end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
        for k in range(0, hidden, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * hidden + ks[None, :],
                        mask=row_ok[:, None] & (ks[None, :] < hidden), other=0.0)
            w = tl.load(w_ptr + offs[None, :].to(tl.int64) * hidden + ks[:, None],
                        mask=(ks[:, None] < hidden) & (offs[None, :] < end), other=0.0)
            if UPCAST:
                h, w = h.to(tl.float32), w.to(tl.float32)
            if FP32:  # float32 as float32, not TF32: the logits path's sums
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if FP32:
            x = acc / temperature
        else:  # bfloat16 logits, as the output layer makes them (round to nearest even)
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True) / temperature
        blocks = zero + (start // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)[None, :]
        noise = _gumbel(seed, blocks, position, id_lo, id_hi)
        score = tl.where(offs[None, :] < end, x + noise, float("-inf"))
        lane_best, lane_index = _keep_best(score, offs[None, :], lane_best, lane_index)
    best = tl.max(lane_best, axis=1)
    best_index = tl.min(tl.where(lane_best == best[:, None], lane_index, 2147483647), axis=1)
    tl.store(best_ptr + rows * parts + part, best, mask=row_ok)
    tl.store(index_ptr + rows * parts + part, best_index.to(tl.int64), mask=row_ok)


def _parts(blocks: int, programs_per_part: int) -> int:
    """Vocabulary parts per row (block): enough programs (~8192) to fill a GPU."""
    return max(1, min(blocks, triton.cdiv(8192, programs_per_part)))


def _winner(best: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each row's token: the index of its best part's winner (the first part on ties)."""
    return index.gather(1, best.argmax(1, keepdim=True)).squeeze(1)


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
    if filtered(top_k, top_p, min_p):
        _floor_kernel[(batch,)](logits, logits.stride(0), floor, vocab, float(temperature),
                                float(top_k), float(top_p), float(min_p), BLOCK=block)
    blocks = triton.cdiv(vocab, block)
    span = triton.cdiv(blocks, _parts(blocks, batch)) * block
    parts = triton.cdiv(vocab, span)
    best = torch.empty(batch, parts, device=device)
    index = torch.empty(batch, parts, dtype=torch.int64, device=device)
    _gumbel_max_kernel[(batch, parts)](logits, logits.stride(0), floor, seed,
                                       sample_ids.to(device).contiguous(), positions.contiguous(),
                                       best, index, vocab, span, float(temperature),
                                       BLOCK=block)
    return _winner(best, index)


def sample_hidden(hidden: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor,
                  sample_ids: torch.Tensor, position: int | torch.Tensor,
                  temperature: float = 1.0, block_b: int = 16, block_v: int = 128,
                  block_h: int = 64) -> torch.Tensor:
    """One token per row of hidden states [batch, hidden] under the output embedding
    [vocab, hidden] (same dtype, float32 or bfloat16): the token `sample` draws from
    hidden @ weight.T, without ever writing those [batch, vocab] logits. Full vocabulary only
    (top-k, top-p and min-p need the logits)."""
    if temperature == 0:
        return (hidden @ weight.t()).float().argmax(-1)
    batch, width = hidden.shape
    vocab, device = weight.size(0), hidden.device
    hidden, weight = hidden.contiguous(), weight.contiguous()
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    positions = torch.as_tensor(position, device=device).to(torch.int64).expand(batch)
    row_blocks, blocks = triton.cdiv(batch, block_b), triton.cdiv(vocab, block_v)
    span = triton.cdiv(blocks, _parts(blocks, row_blocks)) * block_v
    parts = triton.cdiv(vocab, span)
    best = torch.empty(batch, parts, device=device)
    index = torch.empty(batch, parts, dtype=torch.int64, device=device)
    _hidden_gumbel_max_kernel[(row_blocks, parts)](
        hidden, weight, seed, sample_ids.to(device).contiguous(), positions.contiguous(), best,
        index, batch, vocab, width, span, float(temperature),
        # Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers
        UPCAST=bool(os.environ.get("TRITON_INTERPRET")), FP32=hidden.dtype == torch.float32,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_H=block_h)
    return _winner(best, index)
