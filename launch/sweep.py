"""Sweeps: a base recipe plus a grid of overrides, expanded into runs with stable names.

    program: pretrain            # a program that takes run_dir= (pretrain, finetune)
    recipe: pretrain-cpu         # optional YAML recipe
    out: runs/sweeps/lr          # one run directory per element under it
    base: {stop.steps: 200}      # overrides shared by every element
    grid: {opt.lr: [0.001, 0.002, 0.004]}

Element names come from the grid values (e.g. `lr=0.002`), so a resubmitted sweep finds its
runs again: finished, running (the run directory's lock is held) and pending (its SLURM job,
recorded in `run_dir/slurm-job`, is still queued) ones are left alone; failed and preempted
ones run again.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from forgetless import checkpoint, runlock
from forgetless.cli import PROGRAMS
from forgetless.config import ConfigError, PreemptConfig, read_mapping
from forgetless.launch import slurm

PREEMPTED = PreemptConfig().exit_code  # what the batch script requeues on


def run_dir_programs() -> list[str]:
    """The programs a sweep can run: those that write into a run_dir."""
    return sorted(p for p, (_, schema, _) in PROGRAMS.items()
                  if "run_dir" in schema.__dataclass_fields__)


@dataclass
class Sweep:
    program: str
    out: str
    grid: dict[str, list] = field(default_factory=dict)
    base: dict[str, object] = field(default_factory=dict)
    recipe: str = ""
    name: str = ""


@dataclass(frozen=True)
class Status:
    """Where a run stands: state is finished | running | pending | preempted | failed |
    not run; detail says more (holder, job, exit code). An active run is going on or will
    start by itself (a queued job): resubmitting it would start a second writer."""

    state: str
    detail: str = ""
    active: bool = False

    def __str__(self) -> str:
        return f"{self.state} ({self.detail})" if self.detail else self.state


@dataclass
class Element:
    name: str
    run_dir: Path
    args: list[str]  # program, [recipe], key=value ...

    def job(self) -> str:
        """The SLURM job (`J` or `J_T`) last submitted for this run, or ''."""
        path = self.run_dir / slurm.JOB_FILE
        return path.read_text().strip() if path.exists() else ""

    def exit_code(self) -> int | None:
        """The exit code the launcher recorded for the run's last attempt."""
        path = self.run_dir / "launch-exit-code"
        text = path.read_text().strip() if path.exists() else ""
        return int(text) if text.lstrip("-").isdigit() else None

    def status(self, queue: dict[str, str] | None = None) -> Status:
        """From the newest checkpoint, the run directory's lock, the SLURM queue (job id ->
        state, `slurm.queue()`; asked here if not given) and the recorded exit code."""
        if queue is None:
            queue = slurm.queue() if self.job() else {}
        found = checkpoint.latest(self.run_dir)
        if found is not None and checkpoint.read_state(found).get("finished"):
            return Status("finished")
        holder = runlock.holder(self.run_dir)
        if holder is not None:
            return Status("running", runlock.describe(holder), active=True)
        job, code = self.job(), self.exit_code()
        if job in queue:
            if code == PREEMPTED:
                return Status("preempted", f"requeued: job {job} {queue[job].lower()}", True)
            return Status("pending" if queue[job] == "PENDING" else "running",
                          f"job {job} {queue[job].lower()}", True)
        if code == PREEMPTED:
            return Status("preempted", f"exit {code}; resubmit to resume")
        if code:
            return Status("failed", f"exit {code}")
        return Status("not run")


def _value(value: object) -> str:
    """An override's value as the command line spells it (null, true, lists as JSON)."""
    return json.dumps(value) if value is None or isinstance(value, (bool, list, dict)) \
        else str(value)


def load(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep: file {path} does not exist")
    data = read_mapping(path, "sweep")
    for key in ("grid", "base"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"sweep {path}: {key} must be a mapping of key: value")
    unknown = set(data) - set(Sweep.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"sweep {path}: unknown keys {', '.join(sorted(unknown))}")
    for key in ("program", "out"):
        if not data.get(key):
            raise ConfigError(f"sweep {path}: {key} is required")
    if data["program"] not in run_dir_programs():
        raise ConfigError(f"sweep {path}: program {data['program']!r} does not write a run_dir; "
                          f"a sweep can run {', '.join(run_dir_programs())}")
    for key, values in (data.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep {path}: grid.{key} must be a non-empty list")
    return Sweep(**{"name": path.stem, **data})


def elements(sweep: Sweep) -> list[Element]:
    keys = list(sweep.grid)
    out = []
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        name = "_".join(f"{k.rsplit('.', 1)[-1]}={_value(v)}" for k, v in zip(keys, values,
                                                                              strict=True))
        name = re.sub(r"[^A-Za-z0-9=._-]+", "-", name) or "run"
        run_dir = Path(sweep.out) / name
        overrides = {**sweep.base, **dict(zip(keys, values, strict=True)),
                     "run_dir": str(run_dir)}
        args = [sweep.program, *([sweep.recipe] if sweep.recipe else []),
                *(f"{k}={_value(v)}" for k, v in overrides.items())]
        out.append(Element(name, run_dir, args))
    names = [e.name for e in out]
    if len(set(names)) < len(names):
        raise ConfigError(f"sweep {sweep.name}: grid values repeat (runs named "
                          f"{sorted({n for n in names if names.count(n) > 1})})")
    return out
