"""One KV-cache decode step with fixed shapes, so that CUDA can capture it in a graph.

megatron-core's static decode advances its cache by a Python int each step (a graph would
freeze it) and its CUDA-graph decode needs flash-attn's kv-cache kernel. Here the step reuses
the model's own modules (norms, projections, MLP, rotary, output layer; TP included) and only
attention is ours: the position is a tensor, keys and values are written at it, and every
step attends over the whole cache under a mask. On CUDA `generate` captures step + sampling
once and replays it per position; on the CPU the same step runs eagerly and attends over the
filled slots only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import Float16Module

from forgetless.errors import UserError


class Decoder:
    """Static key/value buffers [batch, query groups / tp, seq_len, head_dim] per layer of
    `model` (attention's own layout: read without a copy)."""

    def __init__(self, model: torch.nn.Module, batch: int, seq_len: int):
        self.model = model.module if isinstance(model, Float16Module) else model
        attention = self.model.decoder.layers[0].self_attention
        weight = attention.linear_qkv.weight
        shape = (batch, attention.num_query_groups_per_partition, seq_len,
                 attention.hidden_size_per_attention_head)
        self.cache = [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                       torch.zeros(shape, dtype=weight.dtype, device=weight.device))
                      for _ in self.model.decoder.layers]
        self.freqs = self.model.rotary_pos_emb(seq_len)  # [seq_len, 1, 1, head_dim]
        self.slots = torch.arange(seq_len, device=weight.device)
        self.eager = weight.device.type != "cuda"  # on CUDA the step may become a graph

    def step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """float32 logits [batch, vocab] of the next token after `tokens` [batch] placed at
        `position` (a 1-element int64 tensor on the model's device)."""
        logits, _ = self.model.output_layer(self.hidden(tokens, position).unsqueeze(0),
                                            weight=self.output_weight,
                                            runtime_gather_output=True)
        return logits[0].float()

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab / tp, hidden]: logits = hidden @ output_weight.T (this rank's slice; the
        input embedding's when they are tied)."""
        if self.model.share_embeddings_and_output_weights:
            return self.model.shared_embedding_or_output_weight()
        return self.model.output_layer.weight

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                visible: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Attention of the one query per row over the cache, [b, heads, 1, head_dim]. Eager
        steps (off CUDA: no graph to keep shapes fixed for) read only the filled slots, 2.5x
        faster on a CPU than the whole cache under a mask, with the same values."""
        gqa = keys.size(1) != q.size(2)
        q = q.permute(1, 2, 0, 3)
        if self.eager:
            filled = int(position) + 1
            return F.scaled_dot_product_attention(q, keys[:, :, :filled], values[:, :, :filled],
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible,
                                              enable_gqa=gqa)

    def hidden(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [batch, hidden] that `step` projects to logits;
        the cache is written here."""
        model, config = self.model, self.model.config
        x = model.embedding(input_ids=tokens.view(-1, 1),
                            position_ids=position.expand(tokens.numel(), 1))  # [1, b, h]
        freqs = self.freqs.index_select(0, position)
        visible = (self.slots <= position).view(1, -1)  # [query, slot]
        for layer, (keys, values) in zip(model.decoder.layers, self.cache, strict=True):
            attention = layer.self_attention
            q, k, v = attention.get_query_key_value_tensors(layer.input_layernorm(x), None)
            q = apply_rotary_pos_emb(q, freqs, config)
            k = apply_rotary_pos_emb(k, freqs, config)
            keys.index_copy_(2, position, k.permute(1, 2, 0, 3))  # [b, groups, 1, head_dim]
            values.index_copy_(2, position, v.permute(1, 2, 0, 3))
            context = self._attend(q, keys, values, visible, position)
            out, _ = attention.linear_proj(context.permute(2, 0, 1, 3).flatten(2))
            x = x + out
            out, _ = layer.mlp(layer.pre_mlp_layernorm(x))
            x = x + out
        return model.decoder.final_layernorm(x)[0]


def capture_failure(error: BaseException) -> bool:
    """Whether an error is CUDA or torch refusing the capture itself (an operation a graph
    cannot hold: "operation not permitted when stream is capturing", "capture invalidated"),
    which eager decoding avoids; out of memory and other errors are not the flag's fault."""
    return (isinstance(error, RuntimeError) and not isinstance(error, torch.cuda.OutOfMemoryError)
            and "captur" in str(error).lower())


@contextmanager
def capture_errors() -> Iterator[None]:
    """A capture failure becomes a UserError naming kernels.cuda_graph=false; the rest
    propagate unchanged."""
    try:
        yield
    except RuntimeError as e:
        if not capture_failure(e):
            raise
        raise UserError(f"capturing the decode step as a CUDA graph failed ({e}); "
                        f"kernels.cuda_graph=false decodes the same steps eagerly") from e


def graphed(step: Callable[[], torch.Tensor], warmup: int = 2) -> Callable[[], torch.Tensor]:
    """`step` (reading and writing only fixed tensors) captured as a CUDA graph: the returned
    function replays it and returns its (reused) output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with capture_errors():
        with torch.cuda.graph(graph):
            out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay
