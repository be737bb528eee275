"""The one training loop: steps, logging, evaluation, stopping, checkpoints, resume.

Recipes give it an engine (forgetless/engine.py: the model with its optimizer), a batch
iterator with a state, a plan that turns a batch into microbatches with their losses, and an eval.
Every rank runs this loop; decisions (stop, save) are taken from values all ranks share.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from forgetless import checkpoint, parallel, schedule
from forgetless.atomic import atomic_write_text
from forgetless.config import CheckpointConfig, EvalConfig, OptConfig, PreemptConfig, StopConfig
from forgetless.engine import Engine
from forgetless.errors import Preempted
from forgetless.metrics import MetricsLog
from forgetless.optim import lr_at, set_lr


def initial_state(data: dict | None = None) -> dict:
    """The progress a fresh run starts from (a checkpoint's state.json holds the same keys)."""
    return {"step": 0, "tokens": 0, "finished": False, "best": math.inf, "stale": 0,
            "data": data}


PROGRESS = ("step", "tokens", "finished", "best", "stale")


def step_budget(stop: StopConfig, tokens_per_step: int, n_params: int,
                train_tokens: int) -> int | None:
    """Steps allowed by the token, tokens-per-parameter, epoch and step limits (None: unbounded)."""
    limits = []
    if stop.steps:
        limits.append(stop.steps)
    for tokens in (stop.tokens,
                   stop.tokens_per_param and stop.tokens_per_param * n_params,
                   stop.epochs and stop.epochs * train_tokens):
        if tokens:
            limits.append(math.ceil(tokens / tokens_per_step))
    return min(limits) if limits else None


class Batches(Protocol):
    """An endless batch iterator whose state a checkpoint stores to continue it exactly."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...


@dataclass
class Run:
    """What the loop needs; recipes fill it in."""

    run_dir: Path
    engine: Engine
    data: Batches
    plan: Callable[[Any], list[schedule.Micro]]  # a batch -> this rank's microbatches
    eval_fn: Callable[[], dict]
    opt: OptConfig
    stop: StopConfig
    eval: EvalConfig
    ckpt: CheckpointConfig
    tokens_per_step: int
    total_steps: int | None
    checkpoint_state: Callable[[], dict]  # config and references stored with each checkpoint
    preempt: PreemptConfig
    flops_per_token: float = 0.0  # model FLOPs per trained token, for utilisation
    # facts about the run recorded with its step-0 evaluation (e.g. where the replay came from)
    about: dict = field(default_factory=dict)
    step: int = 0
    tokens: int = 0
    finished: bool = False  # a stop condition held; a restarted run only evaluates
    best: float = math.inf  # best valid_ntp so far, and evaluations since it (early stopping)
    stale: int = 0


def train_step(run: Run, batch: Any, stopping: Callable[[], bool] = bool
               ) -> tuple[float, float, dict, bool]:
    """One optimizer step over the batch's microbatches: (loss, grad norm, extras, whether
    `stopping()` held on any rank after the step), as every rank sees them."""
    results, grad_norm = run.engine.step(run.plan(parallel.to_device(batch)))
    extra, stop = schedule.reduce(results, stopping())
    return extra.pop("loss"), grad_norm, extra, stop


def _converged(run: Run, valid_ntp: float) -> bool:
    """Target validation loss reached, or no improvement for stop.patience evaluations."""
    if valid_ntp < run.best:
        run.best, run.stale = valid_ntp, 0
    else:
        run.stale += 1
    if run.stop.valid_loss is not None and valid_ntp <= run.stop.valid_loss:
        return True
    return run.stop.patience is not None and run.stale >= run.stop.patience


def _save(run: Run, log: dict) -> Path:
    state = {"tokens": run.tokens, "finished": run.finished, "data": run.data.state_dict(),
             "best": run.best, "stale": run.stale, "last": log, **run.checkpoint_state()}
    return checkpoint.save(run.run_dir, run.step, run.engine, state, run.ckpt.keep)


class _Signals:
    """Notes the preemption signals; the loop stops at a step every rank agrees on."""

    def __init__(self, names: list[str]):
        self.received: str | None = None
        self.previous = {}
        for name in names:
            number = getattr(signal, name)
            self.previous[number] = signal.signal(number, self._note)

    def _note(self, number: int, _frame: object) -> None:
        self.received = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _throughput(run: Run, steps: int, seconds: float) -> dict:
    per_rank = steps * run.tokens_per_step / seconds / parallel.world_size()
    out = {"tokens_per_s": per_rank * parallel.world_size(), "tokens_per_s_per_rank": per_rank}
    if run.eval.peak_tflops and run.flops_per_token:
        out["mfu"] = per_rank * run.flops_per_token / (run.eval.peak_tflops * 1e12)
    return out


def fit(run: Run, log: MetricsLog | None) -> dict:
    """Train until a stop condition holds; returns the final evaluation record.

    Raises Preempted after checkpointing when a preemption signal reached any rank."""
    if run.finished:
        return {"step": run.step, "tokens": run.tokens, **run.eval_fn()}
    write = log.write if log is not None else (lambda record: None)
    if run.step == 0:  # the starting point: for finetuning, the teacher's own losses
        write({"step": 0, "tokens": 0, "elapsed_s": 0.0, **run.about, **run.eval_fn()})
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", mininterval=1.0,
               dynamic_ncols=True, disable=log is None)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    start = time.perf_counter()
    record: dict = {}
    signals = _Signals(run.preempt.signals)
    try:
        while True:
            set_lr(run.engine, lr_at(run.step, run.opt, run.total_steps))
            loss, grad_norm, extra, preempted = train_step(
                run, next(run.data), lambda: signals.received is not None)
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"step {run.step + 1}: loss {loss}, grad norm {grad_norm}; the last good "
                    f"checkpoint is {checkpoint.latest(run.run_dir)}")
            run.step += 1
            run.tokens += run.tokens_per_step
            window_loss += loss
            window_steps += 1
            bar.update(1)
            done = run.total_steps is not None and run.step >= run.total_steps
            evaluate_now = done or run.step % run.eval.interval == 0
            logged = evaluate_now or run.step % run.eval.log_interval == 0
            if logged:
                record = {
                    "step": run.step,
                    "tokens": run.tokens,
                    "train_loss": window_loss / window_steps,
                    "lr": run.engine.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    **_throughput(run, window_steps, time.perf_counter() - window_start),
                    "elapsed_s": time.perf_counter() - start,
                    **extra,
                }
                if evaluate_now:
                    with run.engine.synced():
                        record.update(run.eval_fn())
                    done = done or _converged(run, record["valid_ntp"])
                write(record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"valid": f"{record['valid_ntp']:.3f}"}
                                   if "valid_ntp" in record else {}))
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            run.finished = done
            if done or preempted or (run.ckpt.interval and run.step % run.ckpt.interval == 0):
                with run.engine.synced():
                    path = _save(run, record)
            if done:  # a signal at the last step: finished, nothing to requeue
                return record
            if preempted:
                raise Preempted(f"preempted: checkpoint {path} at step {run.step}",
                                run.preempt.exit_code)
    finally:
        signals.restore()
        bar.close()


def train(run: Run, resolved_config: dict) -> dict:
    """Record the config, then fit while appending to metrics.jsonl; the final record."""
    log = None
    if parallel.is_main():
        atomic_write_text(run.run_dir / "config.json", json.dumps(resolved_config, indent=2))
        log = MetricsLog(run.run_dir / "metrics.jsonl", resume_step=run.step)
    try:
        return fit(run, log)
    finally:
        if log is not None:
            log.close()
