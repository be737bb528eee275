"""Sweeps: a base recipe plus a grid of overrides, expanded into runs with stable names.

    program: pretrain            # any forgetless program that takes run_dir=
    recipe: pretrain-cpu         # optional YAML recipe
    out: runs/sweeps/lr          # one run directory per element under it
    base: {stop.steps: 200}      # overrides shared by every element
    grid: {opt.lr: [0.001, 0.002, 0.004]}

Element names come from the grid values (e.g. `lr=0.002`), so a resubmitted sweep finds its
runs again: finished ones are skipped, failed ones are reported with their exit code and log.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from forgetless import checkpoint
from forgetless.config import ConfigError, read_mapping


@dataclass
class Sweep:
    program: str
    out: str
    grid: dict[str, list] = field(default_factory=dict)
    base: dict[str, object] = field(default_factory=dict)
    recipe: str = ""
    name: str = ""


@dataclass
class Element:
    name: str
    run_dir: Path
    args: list[str]  # program, [recipe], key=value ...

    def status(self) -> str:
        """finished | failed (exit N) | not run."""
        found = checkpoint.latest(self.run_dir)
        if found is not None and checkpoint.read_state(found).get("finished"):
            return "finished"
        code = self.run_dir / "launch-exit-code"
        if code.exists() and code.read_text().strip() not in ("", "0"):
            return f"failed (exit {code.read_text().strip()})"
        return "not run"


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
