"""Fused per-token KL(teacher || student) and next-token cross-entropy in Triton.

One program per token streams the student and teacher logits of its vocabulary slice in
blocks with an online log-sum-exp (float32 accumulation), so no softmax tensor is ever
written; the backward recomputes the gradient softmax(s) - softmax(t) (+ the cross-entropy
term) block by block. Under TP each rank runs it on its vocabulary slice and the partial
statistics meet in one all-gather of [tokens, 4] tensors. `fused_linear_kl_ce` goes further and
takes hidden states and output embeddings: logits are made `chunk` tokens at a time and
never exist whole (the idea of Liger-Kernel's fused linear losses).

The PyTorch reference is `reference`; both give exactly zero KL and zero KL gradient when
student and teacher logits are equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from forgetless.losses import gather_slices, merge_kl


@triton.jit
def _stats_kernel(s_ptr, t_ptr, labels_ptr, stats_ptr, stride, vocab, vocab_start,
                  BLOCK: tl.constexpr):
    """Per token of this vocabulary slice: lse_s, lse_t, B = sum softmax(t) * (t - s) (local
    normalisation) and the student logit of the label (0 when another slice holds it)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row) - vocab_start
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_s = tl.full((), 0.0, tl.float32)
    z_t = tl.full((), 0.0, tl.float32)
    acc = tl.full((), 0.0, tl.float32)
    s_label = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        s0 = tl.load(s_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        t0 = tl.load(t_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, s0, float("-inf"))
        t = tl.where(mask, t0, float("-inf"))
        new_s = tl.maximum(m_s, tl.max(s))
        z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s))
        m_s = new_s
        new_t = tl.maximum(m_t, tl.max(t))
        scale = tl.exp(m_t - new_t)
        e_t = tl.exp(t - new_t)
        z_t = z_t * scale + tl.sum(e_t)
        acc = acc * scale + tl.sum(e_t * (t0 - s0))
        m_t = new_t
        s_label += tl.sum(tl.where(offs == label, s, 0.0))
    tl.store(stats_ptr + row * 4 + 0, m_s + tl.log(z_s))
    tl.store(stats_ptr + row * 4 + 1, m_t + tl.log(z_t))
    tl.store(stats_ptr + row * 4 + 2, acc / z_t)
    tl.store(stats_ptr + row * 4 + 3, s_label)


@triton.jit
def _grad_kernel(s_ptr, t_ptr, labels_ptr, lse_ptr, g_ptr, out_ptr, stride, vocab,
                 vocab_start, BLOCK: tl.constexpr):
    """d/ds of g_kl * KL + g_ce * CE: g_kl (p_s - p_t) + g_ce (p_s - onehot(label))."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row) - vocab_start
    lse_s = tl.load(lse_ptr + row * 2)
    lse_t = tl.load(lse_ptr + row * 2 + 1)
    g_kl = tl.load(g_ptr + row * 2)
    g_ce = tl.load(g_ptr + row * 2 + 1)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        s = tl.load(s_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        p_s = tl.exp(s - lse_s)
        grad = g_kl * (p_s - tl.exp(t - lse_t)) + g_ce * (p_s - (offs == label).to(tl.float32))
        tl.store(out_ptr + row * stride + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _vocab_start(vocab: int, group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) * vocab if group is not None else 0


def _combine(stats: torch.Tensor, group: dist.ProcessGroup | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (lse_s, lse_t, KL, CE) per token from each TP slice's statistics."""
    parts = gather_slices(stats, group)
    lse_s, lse_t, kl = merge_kl(parts)
    return lse_s, lse_t, kl, lse_s - parts[..., 3].sum(0)


class _FusedKLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, block, group):
        shape = student.shape[:-1]
        s = student.reshape(-1, student.size(-1)).contiguous()
        t = teacher.reshape(-1, teacher.size(-1)).contiguous()
        y = labels.reshape(-1).contiguous()
        vocab = s.size(-1)
        stats = torch.empty(s.size(0), 4, dtype=torch.float32, device=s.device)
        _stats_kernel[(s.size(0),)](s, t, y, stats, s.stride(0), vocab,
                                    _vocab_start(vocab, group), BLOCK=block)
        lse_s, lse_t, kl, ce = _combine(stats, group)
        ctx.save_for_backward(s, t, y, torch.stack([lse_s, lse_t], -1).contiguous())
        ctx.shape, ctx.block, ctx.group = student.shape, block, group
        return kl.view(shape), ce.view(shape)

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        s, t, y, lse = ctx.saved_tensors
        g = torch.stack([g_kl.reshape(-1), g_ce.reshape(-1)], -1).float().contiguous()
        grad = torch.empty_like(s)
        _grad_kernel[(s.size(0),)](s, t, y, lse, g, grad, s.stride(0), s.size(-1),
                                   _vocab_start(s.size(-1), ctx.group), BLOCK=ctx.block)
        return grad.view(ctx.shape), None, None, None, None


def kl_ce(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
          block: int = 1024, group: dist.ProcessGroup | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (KL(teacher || student), cross-entropy of labels) from [..., vocab / tp]
    logits (`group`: the tensor-parallel group whose ranks hold the vocabulary slices, in
    order; None: the whole vocabulary); gradients flow to the student only."""
    return _FusedKLCE.apply(student, teacher.detach(), labels, block, group)


def reference(student: torch.Tensor, teacher: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch (one process): (KL, CE) per token, float32 or float64."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_s = torch.log_softmax(student.to(dtype), -1)
    log_t = torch.log_softmax(teacher.detach().to(dtype), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    ce = -log_s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return kl, ce


class _FusedLinearKLCE(torch.autograd.Function):
    """(lam * mean KL + ce_weight * mean CE) from hidden states. Its gradients are computed
    chunk by chunk in the forward, and each [chunk, vocab] logits tensor is dropped at once."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, lam, ce_weight, chunk, block,
                group):
        n = hidden.size(0)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            with torch.enable_grad():
                s = (h @ weight.t()).detach().requires_grad_(True)
                kl, ce = kl_ce(s, t_hidden[start:start + chunk] @ t_weight.t(),
                               labels[start:start + chunk], block, group)
                ((lam * kl.sum() + ce_weight * ce.sum()) / n).backward()
            sums += torch.stack([kl.detach().sum(), ce.detach().sum()]).float()
            g = s.grad.to(h.dtype)
            grad_h[start:start + chunk] = g @ weight
            grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        kl_mean, ce_mean = sums / n
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return lam * kl_mean + ce_weight * ce_mean, kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _kl, _ce):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss, grad_w * grad_loss) + (None,) * 9


def fused_linear_kl_ce(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                       teacher_weight: torch.Tensor, labels: torch.Tensor, lam: float = 1.0,
                       ce_weight: float = 1.0, chunk: int = 1024, block: int = 1024,
                       group: dist.ProcessGroup | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean KL, mean CE) for student hidden states [tokens, h] and output embedding
    [vocab / tp, h] against the teacher's, loss = lam * mean KL + ce_weight * mean CE, without
    ever holding [tokens, vocab] logits. Gradients reach hidden and weight."""
    return _FusedLinearKLCE.apply(hidden, weight, teacher_hidden.detach(),
                                  teacher_weight.detach(), labels, lam, ce_weight, chunk, block,
                                  group)
