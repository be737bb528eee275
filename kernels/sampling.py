"""Sampling the next token from logits: temperature, optional top-k / top-p, Gumbel-max.

The uniforms come from Philox keyed on (seed; vocab block, position, sample id), so a row's
token depends only on its logits and (seed, sample id, position): not on the batch it is in.
This is the PyTorch reference; `sampling_triton.py` draws the same uniforms in one fused pass.
"""

from __future__ import annotations

import math

import torch

from forgetless.kernels.philox import uniforms


def gumbel_noise(seed: int, sample_ids: torch.Tensor, position: int | torch.Tensor,
                 vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [batch, vocab] for each row's (seed, sample id, position)."""
    position = torch.as_tensor(position, device=sample_ids.device).expand(sample_ids.numel())
    return -torch.log(exponential(uniforms(seed, sample_ids, position, vocab)))


def exponential(u: torch.Tensor) -> torch.Tensor:
    """-log(u), with log1p's series where u is within 2^-8 of 1: there the largest Gumbel
    values are made, and a GPU's fast logarithm (Triton's) is too coarse. The Triton kernel
    uses the same formula, so both paths agree."""
    w = 1.0 - u  # exact for u in [0.5, 1)
    return torch.where(w < 1.0 / 256, w * (1.0 + w * (0.5 + w * (1.0 / 3.0))), -torch.log(u))


def filtered(top_k: int, top_p: float, min_p: float) -> bool:
    """Whether any of top-k, top-p and min-p removes tokens (else: the full vocabulary)."""
    return bool(top_k) or top_p < 1.0 or min_p > 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Logits with tokens outside the top-k, min-p (probability below min_p x the largest)
    and top-p (nucleus) sets at -inf, applied in that order."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        floor = logits.max(-1, keepdim=True).values + math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token if the mass before it is below top_p (the first token is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seed: int, sample_ids: torch.Tensor,
           position: int | torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """One token per row of logits [batch, vocab]; temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)
    return (logits + gumbel_noise(seed, sample_ids, position, logits.size(-1))).argmax(-1)
