"""Philox-4x32-10 in PyTorch, bit-identical to triton.language.philox with 32-bit counters.

Sampling keys each uniform on (seed; vocab index, position, sample id) so the same sample id
draws the same numbers on any batch size, rank count, or backend (this and the Triton kernel);
initialisation keys each weight on (seed; its parameter, row and column), so every layout
draws only its own slice of the same weights. uint32 arithmetic is emulated in int64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a uint32 constant and a uint32 tensor.

    The int64 product wraps past 2**63, but its low 64 bits (all we read) are exact.
    """
    product = b * a
    return (product >> 32) & MASK32, product & MASK32


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
           c3: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Four uint32 outputs (as int64) for counters c0..c3 (broadcastable int64 tensors)."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(c.to(torch.int64) & MASK32 for c in
                                               (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniforms(seed: int, rows: torch.Tensor, position: torch.Tensor, n: int) -> torch.Tensor:
    """float32 uniforms [rows, n] in (0, 1): element j of a row uses output j % 4 of the Philox
    call with counters (j // 4, position, row id low, row id high)."""
    rows = rows.to(torch.int64).view(-1, 1)
    position = position.to(torch.int64).view(-1, 1)
    block = torch.arange((n + 3) // 4, dtype=torch.int64, device=rows.device).view(1, -1)
    out = philox(seed, block, position, rows & MASK32, rows >> 32)
    return uniform(torch.stack(out, dim=-1).flatten(1)[:, :n])


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in the open interval (0, 1), from the top 23 bits: (k + 0.5) / 2^23
    is exact in float32 (with 24 bits the largest value would round up to 1.0, an infinite
    Gumbel draw)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _key_words(key: str) -> tuple[int, int]:
    """Two 32-bit words naming a stream (a parameter), from its name."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


NORMAL_CHUNK = 1 << 20  # elements drawn at once: bounds the int64 temporaries


@torch.no_grad()
def normal_slice_(out: torch.Tensor, seed: int, key: str, shape: Sequence[int],
                  offsets: Sequence[int]) -> torch.Tensor:
    """Fill `out` with standard normals: the block at `offsets` of a tensor of `shape` whose
    element values depend only on (seed, key, the element's index). Any slicing of the tensor
    (tensor or pipeline parallel) thus draws the numbers of the whole, without drawing it.

    Row r of the tensor (its leading dims flattened) and column block j (4 columns) use the
    Philox call with counters (j, r, key words); Box-Muller turns its four uniforms into the
    four columns' normals. Only the blocks the slice covers are computed."""
    k0, k1 = _key_words(key)
    cols, first, width = shape[-1], offsets[-1], out.shape[-1]
    if first + width > cols or out.dim() != len(shape):
        raise ValueError(f"slice {tuple(out.shape)} at {tuple(offsets)} is outside {shape}")
    rows = torch.zeros((), dtype=torch.int64, device=out.device)
    for size, offset, local in zip(shape[:-1], offsets[:-1], out.shape[:-1], strict=True):
        index = torch.arange(offset, offset + local, dtype=torch.int64, device=out.device)
        rows = (rows.unsqueeze(-1) * size + index).flatten()
    rows = rows.reshape(-1, 1)
    blocks = torch.arange(first // 4, (first + width + 3) // 4, dtype=torch.int64,
                          device=out.device).view(1, -1)
    skip = first - 4 * (first // 4)
    target = out if out.is_contiguous() else torch.empty(out.shape, device=out.device)
    flat = target.view(-1, width)
    step = max(1, NORMAL_CHUNK // (4 * blocks.numel()))
    for lo in range(0, rows.size(0), step):
        r = rows[lo:lo + step]
        bits = philox(seed, blocks, r, torch.tensor(k0), torch.tensor(k1))
        u = [uniform(b) for b in bits]
        radius = [torch.sqrt(-2 * torch.log(u[i])) for i in (0, 2)]
        angle = [2 * math.pi * u[i] for i in (1, 3)]
        z = torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                         radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])],
                        dim=-1).flatten(1)
        flat[lo:lo + step] = z[:, skip:skip + width]
    if target is not out:
        out.copy_(target)
    return out
