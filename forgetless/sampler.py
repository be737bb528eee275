"""Ancestral sampling with a KV cache (`decode.py`): on CUDA with the Triton sampler each step
(forward + sampling) is one CUDA-graph replay, so small models are not bound by kernel
launches and Python; without top-k/top-p/min-p and at TP 1 the Triton sampler draws straight
from the final hidden states, never writing [batch, vocab] logits.

Every sequence starts from a given first token (the previous dataset's domain token) and runs
the full length; the token at position t of sample i depends only on (seed, i, t) and the model.
"""

from __future__ import annotations

import torch

from forgetless import kernels, parallel
from forgetless.decode import Decoder, graphed
from forgetless.kernels import sampling


@torch.no_grad()
def generate(model: torch.nn.Module, first_token: int, sample_ids: torch.Tensor, seq_len: int,
             seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, backend: str = "torch", cuda_graph: bool = True
             ) -> torch.Tensor:
    """Sequences [len(sample_ids), seq_len] (int64). backend, cuda_graph: as in kernels.*"""
    triton = kernels.backend(backend) == "triton"
    if triton:
        from forgetless.kernels.sampling_triton import sample, sample_hidden
    else:
        sample = sampling.sample
    # the full vocabulary on one rank: sample straight from hidden states, no logits
    from_hidden = triton and not sampling.filtered(top_k, top_p, min_p) and \
        parallel.tp_size() == 1
    was_training = model.training
    model.eval()
    batch = sample_ids.numel()
    device = parallel.device()
    sample_ids = sample_ids.to(device)
    tokens = torch.empty(batch, seq_len, dtype=torch.int64, device=device)
    tokens[:, 0] = first_token
    decoder = Decoder(model, batch, seq_len)
    current = tokens[:, 0].clone()
    position = torch.zeros(1, dtype=torch.int64, device=device)
    key = torch.tensor(seed, device=device) if triton else seed  # a tensor survives graphs

    def step() -> torch.Tensor:
        if from_hidden:
            return sample_hidden(decoder.hidden(current, position), decoder.output_weight, key,
                                 sample_ids, position + 1, temperature)
        return sample(decoder.step(current, position), key, sample_ids, position + 1,
                      temperature, top_k, top_p, min_p)

    run = graphed(step) if cuda_graph and triton and device.type == "cuda" else step
    for t in range(seq_len - 1):
        position.fill_(t)
        current.copy_(tokens[:, t])
        tokens[:, t + 1] = run()
    model.train(was_training)
    return tokens
