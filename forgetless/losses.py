"""Per-token losses from (vocabulary-parallel) logits: next-token cross-entropy and
KL(teacher || student). Under TP each rank holds a slice of the vocabulary; the reductions
over it are collectives of per-token statistics, never a gather of full-vocabulary logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from forgetless import parallel


def ntp(student_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss [s-1, b] from logits in megatron's layout [s-1, b, v / tp] and
    tokens [b, s]. Under TP megatron's kernel overwrites float32 logits in place: compute any
    other loss on the same logits first."""
    labels = tokens[:, 1:].t().contiguous()
    if parallel.tp_size() > 1:
        return vocab_parallel_cross_entropy(student_logits.float(), labels)
    return F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(),
                           reduction="none").view_as(labels)


def gather_slices(stats: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every TP rank's per-token statistics [tokens, k] stacked [tp, tokens, k] (one
    all-gather; [1, tokens, k] without a group)."""
    if group is None:
        return stats.unsqueeze(0)
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts)


def merge_kl(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-vocabulary (lse_s, lse_t, KL) per token from vocabulary slices' statistics
    [slices, tokens, (lse_s, lse_t, b, ...)], b = sum over the slice of softmax(t) * (t - s)
    normalised within it. Exact for one slice: the log-sum-exp of one value is that value."""
    lse_s, lse_t = torch.logsumexp(parts[..., 0], 0), torch.logsumexp(parts[..., 1], 0)
    b = (torch.exp(parts[..., 1] - lse_t) * parts[..., 2]).sum(0)
    return lse_s, lse_t, b + lse_s - lse_t


class _KL(torch.autograd.Function):
    """KL(teacher || student) per token; its gradient softmax(s) - softmax(t) is made in the
    forward (when the student logits need one), CHUNK tokens at a time.

    Why chunks: every full-vocabulary temporary ([tokens, vocab] float32, tens of MB) costs a
    trip through memory and fresh pages from the allocator, while a chunk's stay in cache;
    this pass is what kl_pre adds to finetuning besides the teacher. The exponentials are
    shared between value and gradient (two per logit), and equal student and teacher logits
    give exactly zero KL and zero gradient. Under TP each rank's vocabulary slice is its own;
    the slices meet in one all-gather of per-token statistics."""

    CHUNK = 128

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)  # float32 or float64
        s = student.reshape(-1, student.size(-1))
        t = teacher.reshape(-1, teacher.size(-1))
        n, group, keep = s.size(0), parallel.vocab_group(), ctx.needs_input_grad[0]
        grad = torch.empty(s.shape, dtype=dtype, device=s.device) if keep else None
        # under TP the gradient is normalised once the slices meet: keep exp(t - max) till then
        e_teacher = torch.empty_like(grad) if keep and group is not None else None
        stats = torch.empty(n, 3, dtype=dtype, device=s.device)  # lse_s, lse_t, b of this slice
        maxes = torch.empty(n, 2, dtype=dtype, device=s.device) if e_teacher is not None else None
        for i in range(0, n, _KL.CHUNK):
            rows = slice(i, i + _KL.CHUNK)
            sc, tc = s[rows].to(dtype), t[rows].to(dtype)
            m_s, m_t = sc.amax(-1, keepdim=True), tc.amax(-1, keepdim=True)
            e_s = torch.sub(sc, m_s, out=grad[rows] if keep else None).exp_()
            e_t = torch.sub(tc, m_t, out=e_teacher[rows] if e_teacher is not None else None).exp_()
            z_s, z_t = e_s.sum(-1, keepdim=True), e_t.sum(-1, keepdim=True)
            b = torch.linalg.vecdot(e_t, tc - sc).unsqueeze(-1) / z_t
            stats[rows] = torch.cat([m_s + z_s.log(), m_t + z_t.log(), b], -1)
            if maxes is not None:
                maxes[rows] = torch.cat([m_s, m_t], -1)
            elif keep:  # this slice is the whole vocabulary: normalise now
                e_s.div_(z_s).sub_(e_t.div_(z_t))
        lse_s, lse_t, out = merge_kl(gather_slices(stats, group))
        if maxes is not None:
            grad.mul_((maxes[:, :1] - lse_s.unsqueeze(-1)).exp())
            grad.sub_(e_teacher.mul_((maxes[:, 1:] - lse_t.unsqueeze(-1)).exp()))
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return out.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g.reshape(-1, 1)).view(ctx.shape).to(ctx.dtype), None


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token (over the last dimension) in float32 (float64 for
    float64 logits); no gradient to the teacher."""
    return _KL.apply(student_logits, teacher_logits.detach())
