"""Sampling the next token from logits: temperature, optional top-k / top-p, Gumbel-max.

The uniforms come from Philox keyed on (seed; vocab block, position, sample id), so a row's
token depends only on its logits and (seed, sample id, position): not on the batch it is in.
This is the PyTorch reference; a Triton kernel drawing the same uniforms follows in issue 6.
"""

from __future__ import annotations

import torch

from forgetless.kernels.philox import uniforms


def gumbel_noise(seed: int, sample_ids: torch.Tensor, position: int | torch.Tensor,
                 vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [batch, vocab] for each row's (seed, sample id, position)."""
    position = torch.as_tensor(position, device=sample_ids.device).expand(sample_ids.numel())
    return -torch.log(-torch.log(uniforms(seed, sample_ids, position, vocab)))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with tokens outside the top-k / top-p (nucleus) set at -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
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
           top_p: float = 1.0) -> torch.Tensor:
    """One token per row of logits [batch, vocab]; temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return (logits + gumbel_noise(seed, sample_ids, position, logits.size(-1))).argmax(-1)
