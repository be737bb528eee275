"""Evaluation on a fixed set: next-token loss and, given a teacher, KL(teacher || student);
each also over the second half of the positions (where the context is long)."""

from __future__ import annotations

import torch

from forgetless import losses, parallel
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import Manifest


def eval_set(manifest: Manifest, batch_size: int, max_sequences: int,
             split: str = "valid") -> list[torch.Tensor]:
    """The fixed evaluation batches (the first max_sequences; 0: all), read once per run."""
    spec = StreamSpec(manifest, split, batch_size, train=False, limit=max_sequences)
    return [parallel.to_device(batch) for batch in Loader(spec)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor],
             teacher: torch.nn.Module | None = None) -> dict[str, float]:
    """{ntp, ntp_2nd[, kl, kl_2nd]}: means over every token of the evaluation batches."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count, count_2nd = 0, 0
    for batch in batches:
        student = losses.logits(model, batch)
        per_token = {"ntp": losses.ntp(student, batch)}
        if teacher is not None:
            per_token["kl"] = losses.kl(student, losses.logits(teacher, batch))
        half = per_token["ntp"].size(1) // 2
        for key, values in per_token.items():
            for name, part in ((key, values), (f"{key}_2nd", values[:, half:])):
                sums[name] = sums.get(name, 0.0) + part.double().sum().item()
        count += per_token["ntp"].numel()
        count_2nd += per_token["ntp"][:, half:].numel()
    model.train(was_training)
    return {k: v / (count_2nd if k.endswith("_2nd") else count) for k, v in sums.items()}
