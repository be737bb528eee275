"""Per-token losses from logits: next-token cross-entropy and KL(teacher || student)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits [b, s-1, vocab] for packed sequences [b, s]."""
    inputs = tokens[:, :-1]
    positions = torch.arange(inputs.size(1), device=tokens.device).expand_as(inputs)
    return model(inputs, positions, attention_mask=None)


def ntp(student_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss [b, s-1]."""
    return F.cross_entropy(student_logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                           reduction="none").view(tokens.size(0), -1)


class _KL(torch.autograd.Function):
    """KL(teacher || student) per token with the analytic gradient softmax(s) - softmax(t).

    Exactly zero gradient when student and teacher logits are equal, and one saved pair of
    [.., vocab] tensors instead of autograd's chain through log_softmax and kl_div."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)  # float32 or float64
        log_s = F.log_softmax(student.to(dtype), dim=-1)
        log_t = F.log_softmax(teacher.to(dtype), dim=-1)
        p_t = log_t.exp()
        out = torch.linalg.vecdot(p_t, log_t.sub_(log_s))
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
