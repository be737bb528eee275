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


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) [b, s-1], summed over the vocabulary in float32."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
