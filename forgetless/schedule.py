"""Microbatches through megatron-core's pipeline schedules: one path for every TP x PP x DP
layout, one process included.

A step is a list of `Micro`s (this DP rank's rows); on the last pipeline stage each one's
`loss` turns the model output into its contribution to the step's objective, so that the
contributions sum to it (megatron divides each by the number of microbatches, `run` undoes
that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from forgetless import parallel
from forgetless.errors import UserError
from forgetless.model import next_token

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Micro:
    tokens: torch.Tensor  # [rows, seq_len] packed sequences
    loss: LossFn | None = None  # None: the raw output is returned (forward only)
    labels: bool = True  # output per-token losses [rows, s-1]; else logits [s-1, rows, v/tp]


def split(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Microbatches of `size` rows (the last pipeline stage's shapes must all agree)."""
    if rows.size(0) % size:
        raise UserError(f"{rows.size(0)} rows per data-parallel rank do not split into "
                        f"microbatches of {size} rows (see parallel.microbatches)")
    return list(rows.split(size))


def forward(model: torch.nn.Module, micro: Micro) -> torch.Tensor:
    return next_token(model, micro.tokens, micro.labels)


def mean_share(per_token: torch.Tensor, weight: float, n: int, name: str | None = None):
    """weight x the mean next-token loss as one of n equal microbatches' share (and, named,
    the unweighted share as an extra)."""
    value = per_token.mean() / n
    return weight * value, ({name: value.detach()} if name else {})


def run(model: torch.nn.Module, micros: list[Micro], forward_only: bool) -> list:
    """Forward (and backward) every microbatch; on the last stage one entry per microbatch:
    {"loss": contribution, **extras} or, without a loss, the raw output. Elsewhere []."""
    n = len(micros)
    rows = {m.tokens.size(0) for m in micros}
    if parallel.pp_size() > 1 and len(rows) > 1:
        raise UserError(f"pipeline parallelism needs microbatches of one size; this step has "
                        f"{sorted(rows)} rows")

    def step(data: object, chunk: torch.nn.Module):
        micro = next(data)
        output = forward(chunk, micro)
        if micro.loss is None:
            return output, None

        def loss_func(out: torch.Tensor):
            value, extras = micro.loss(out)
            return value * n, {"loss": value.detach(), **extras}

        return output, loss_func

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micros), model=[model], num_microbatches=n,
        seq_length=micros[0].tokens.size(1) - 1, micro_batch_size=max(rows),
        forward_only=forward_only)


def totals(results: list[dict]) -> dict[str, float] | None:
    """Sum of the per-microbatch records on the last stage (None elsewhere)."""
    if not parallel.is_last_stage():
        return None
    out: dict[str, float] = {}
    for record in results:
        for key, value in record.items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


# What a training step's microbatches may report (the objective first): a fixed table, so
# that every rank, on any pipeline stage, knows the slots of the step's one reduction.
STEP_METRICS = ("loss", "down_loss", "reg_loss")


def reduce(results: list[dict], flag: bool) -> tuple[dict[str, float], bool]:
    """The step's objective and extras averaged over DP ranks, and whether the flag (e.g. a
    preemption signal) is up on any rank: one all-reduce of one tensor, one host sync.

    Each metric has a (sum, count) pair of slots; the last stage's first TP rank of each DP
    rank adds its microbatches' values (on the device), every other rank adds zeros."""
    slots = torch.zeros(2 * len(STEP_METRICS) + 1, dtype=torch.float64,
                        device=parallel.device())
    if parallel.is_last_stage() and parallel.tp_rank() == 0:
        for record in results:
            for key, value in record.items():
                if key not in STEP_METRICS:
                    raise KeyError(f"a microbatch reported {key!r}, which is not one of "
                                   f"schedule.STEP_METRICS {STEP_METRICS}")
                i = 2 * STEP_METRICS.index(key)
                slots[i] += value.detach().double()
                slots[i + 1] += 1
    slots[-1] = float(flag)
    if parallel.world_size() > 1:
        dist.all_reduce(slots)
    values = slots.tolist()
    found = {key: values[2 * i] / parallel.dp_size() for i, key in enumerate(STEP_METRICS)
             if values[2 * i + 1]}
    return found, values[-1] > 0
