"""Evaluation on a fixed set: next-token loss and, given a teacher, KL(teacher || student);
each also over the second half of the positions (where the context is long).

Each DP rank takes every dp-th sequence; sums meet on the last pipeline stage's ranks and
every rank gets the same means."""

from __future__ import annotations

import torch

from forgetless import losses, parallel, schedule
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import Manifest
from forgetless.schedule import Micro


def eval_set(manifest: Manifest, batch_size: int, max_sequences: int,
             split: str = "valid") -> list[torch.Tensor]:
    """This DP rank's share of the fixed evaluation batches (the first max_sequences; 0: all),
    read once per run."""
    spec = StreamSpec(manifest, split, max(1, batch_size // parallel.dp_size()), train=False,
                      limit=max_sequences, rank=parallel.dp_rank(), world=parallel.dp_size())
    return [parallel.to_device(batch) for batch in Loader(spec)]


def _sums(per_token: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums of per-token values [positions, rows] over all and over the second half."""
    half = per_token["ntp"].size(0) // 2
    out = {"count": torch.tensor(float(per_token["ntp"].numel())),
           "count_2nd": torch.tensor(float(per_token["ntp"][half:].numel()))}
    for key, values in per_token.items():
        out[key] = values.double().sum()
        out[f"{key}_2nd"] = values[half:].double().sum()
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor],
             teacher: torch.nn.Module | None = None) -> dict[str, float]:
    """{ntp, ntp_2nd[, kl, kl_2nd]}: means over every token of the evaluation batches."""
    was_training = model.training
    model.eval()
    results: list[dict] = []
    for batch in batches:
        target = None
        if teacher is not None:
            target = schedule.run(teacher, [Micro(batch, labels=False)], forward_only=True)

        def stats(student: torch.Tensor, batch=batch, target=target
                  ) -> tuple[torch.Tensor, dict]:
            per_token = {}
            if target is not None:  # before ntp, which consumes the logits
                per_token["kl"] = losses.kl(student, target[0])
            per_token["ntp"] = losses.ntp(student, batch)
            return torch.zeros(()), _sums(per_token)

        results += schedule.run(model, [Micro(batch, stats, labels=False)], forward_only=True)
    model.train(was_training)
    totals = parallel.from_last_stage(schedule.totals(results))
    keys = ("ntp", "kl") if teacher is not None else ("ntp",)
    return {name: totals[name] / totals["count_2nd" if name.endswith("_2nd") else "count"]
            for key in keys for name in (key, f"{key}_2nd")}

