"""Per-token losses from (vocabulary-parallel) logits: next-token cross-entropy and
KL(teacher || student). Under TP each rank holds a slice of the vocabulary; the reductions
over it are all-reduces of [b, s] tensors, never a gather of full-vocabulary logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from forgetless import parallel


def ntp(student_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss [b, s-1]. Under TP megatron's kernel overwrites float32
    logits in place: compute any other loss on the same logits first."""
    labels = tokens[:, 1:]
    if parallel.tp_size() > 1:
        return vocab_parallel_cross_entropy(student_logits.float(), labels)
    return F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(),
                           reduction="none").view_as(labels)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    if parallel.tp_size() == 1:
        return F.log_softmax(x, dim=-1)
    local = torch.logsumexp(x, dim=-1)
    top = local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=parallel.tp_group())
    total = (local - top).exp()
    dist.all_reduce(total, group=parallel.tp_group())
    return x - (top + total.log()).unsqueeze(-1)


class _KL(torch.autograd.Function):
    """KL(teacher || student) per token with the analytic gradient softmax(s) - softmax(t).

    Exactly zero gradient when student and teacher logits are equal, and one saved pair of
    [.., vocab] tensors instead of autograd's chain through log_softmax and kl_div. The
    gradient needs no communication: each TP rank's vocabulary slice is its own."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)  # float32 or float64
        log_s = _log_softmax(student.to(dtype))
        log_t = _log_softmax(teacher.to(dtype))
        p_t = log_t.exp()
        out = torch.linalg.vecdot(p_t, log_t.sub_(log_s))
        if parallel.tp_size() > 1:
            dist.all_reduce(out, group=parallel.tp_group())
        ctx.save_for_backward(log_s, p_t)
        ctx.dtype = student.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_s, p_t = ctx.saved_tensors
        return log_s.exp().sub_(p_t).mul_(grad.unsqueeze(-1)).to(ctx.dtype), None


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) [b, s-1] in float32; no gradient to the teacher."""
    return _KL.apply(student_logits, teacher_logits.detach())
