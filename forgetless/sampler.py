"""Ancestral sampling with megatron-core's static KV cache.

Every sequence starts from a given first token (the previous dataset's domain token) and runs
the full length; the token at position t of sample i depends only on (seed, i, t) and the model.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from forgetless import kernels, parallel
from forgetless.kernels import sampling


@torch.no_grad()
def generate(model: torch.nn.Module, first_token: int, sample_ids: torch.Tensor, seq_len: int,
             seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """Sequences [len(sample_ids), seq_len] (int64). backend: kernels.backend."""
    if kernels.backend(backend) == "triton":
        from forgetless.kernels.sampling_triton import sample
    else:
        sample = sampling.sample
    was_training = model.training
    model.eval()
    batch = sample_ids.numel()
    sample_ids = sample_ids.to(parallel.device())
    tokens = torch.empty(batch, seq_len, dtype=torch.int64, device=sample_ids.device)
    tokens[:, 0] = first_token
    cache = StaticInferenceContext(batch, seq_len)
    for t in range(seq_len - 1):
        position = torch.full((batch, 1), t, device=tokens.device)
        logits = model(tokens[:, t:t + 1], position, attention_mask=None,
                       inference_context=cache, runtime_gather_output=True)[:, -1]
        cache.sequence_len_offset += 1
        tokens[:, t + 1] = sample(logits, seed, sample_ids, t + 1, temperature, top_k, top_p,
                                  min_p)
    model.train(was_training)
    return tokens
