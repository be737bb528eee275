"""Checkpoints: a directory per step, visible only once complete, the newest K kept.

checkpoints/step_00000100/{model.pt, optim.pt, state.json}; state.json holds the step, token
count, loader state, resolved config, and the tokenizer and manifest references.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from forgetless import lora
from forgetless.atomic import publish_dir
from forgetless.config import ModelConfig, load_dict
from forgetless.errors import UserError
from forgetless.model import build_model

PREFIX = "step_"


class CheckpointError(UserError):
    pass


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / "state.json").exists() or (path / "model.pt").exists():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"checkpoint {path}: neither a checkpoint nor a run with one")
    return found


def save(run_dir: str | Path, step: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
                   tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    publish_dir(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    if not (path / "model.pt").exists():
        raise CheckpointError(f"checkpoint {path}: no weights (model.pt is missing)")
    if not (path / "state.json").exists():
        raise CheckpointError(f"checkpoint {path}: state.json is missing")
    try:
        return json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({e.msg})") from e


def check_model_config(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint of another architecture, naming the keys that differ."""
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {v!r} here"
            for k, v in current.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} has another architecture: " + "; ".join(diff))


def load(path: Path, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict:
    state = read_state(path)
    try:
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu",
                                         weights_only=True))
        if optimizer is not None:
            if not (path / "optim.pt").exists():
                raise CheckpointError(f"checkpoint {path}: optim.pt is missing")
            extra = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(extra["optimizer"])
            torch.set_rng_state(extra["rng"])
    except (RuntimeError, EOFError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({e})") from e
    return state


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint holds, built from the architecture it records, and its state."""
    state = read_state(path)
    model = build_model(load_dict(ModelConfig, state["model"]))
    if state.get("lora"):  # a LoRA finetune: load the adapters, then fold them in
        lora.apply(model, state["lora"]["rank"], state["lora"]["alpha"])
        load(path, model)
        lora.merge(model)
        model.requires_grad_(True)
    else:
        load(path, model)
    return model, state


def content_hash(path: Path) -> str:
    """sha256 of a checkpoint's weights: what replay provenance records."""
    digest = hashlib.sha256()
    with open(path / "model.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
