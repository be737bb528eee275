"""Checkpoints: a directory per step, visible only once complete, the newest K kept.

checkpoints/step_00000100/{model/, optim/ or deepspeed/, rng.pt, state.json}: model/ holds the
weights as a megatron-core distributed checkpoint (every rank writes its shards; loadable under
any other TP/PP/DP layout), optim/ megatron's optimizer state (the same kind), deepspeed/ a
DeepSpeed ZeRO checkpoint (the engine=deepspeed training state); state.json holds the step,
token count, every loader's state, resolved config, and the tokenizer and manifest references.
Everything is written into a hidden directory that is renamed into place once every rank has
finished.

A Hugging Face model directory (config.json + safetensors + tokenizer files) is accepted
wherever a checkpoint is: it reads as a step-0 checkpoint whose tokenizer is its own and which
records no data (`hf_state`), and each rank loads only its slices of the weights (`forgetless.hf`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException as DistCheckpointException

from forgetless import hf, lora, parallel
from forgetless.atomic import publish_dir
from forgetless.config import EvalConfig, ModelConfig, OptConfig, load_dict, to_dict
from forgetless.data import tokenizer as tok
from forgetless.engine import Engine, load_weights
from forgetless.errors import UserError
from forgetless.fast_path import OFF, FastPath
from forgetless.model import build_model

PREFIX = "step_"

# megatron-core 0.16 calls torch APIs that warn of their own deprecation on every load
warnings.filterwarnings("ignore", ".*load_state_dict. is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "Please use DTensor instead", FutureWarning)


class CheckpointError(UserError):
    pass


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's name gives (step_00000100 -> 100), None if not one."""
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoints, oldest first by step (names sort wrongly past 10^8)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
                  key=step_of)


def latest(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def clean(run_dir: str | Path) -> list[Path]:
    """Remove what killed saves leave in checkpoints/ (hidden .step_N.tmp directories and other
    hidden temporaries). Every rank calls it at start, under the run-directory lock; the main
    rank removes, and returns what it removed."""
    root = Path(run_dir) / "checkpoints"
    stale = []
    if parallel.is_main() and root.is_dir():
        stale = sorted(p for p in root.iterdir() if p.name.startswith("."))
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    _barrier()
    return stale


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (by step)."""
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, a Hugging Face model directory, or a run directory's newest
    checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / "state.json").exists() or (path / "model").exists() or hf.is_hf_model(path):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"checkpoint {path}: neither a checkpoint nor a run with one")
    return found


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resume_path(run_dir: str | Path, resume: str) -> Path | None:
    """resume=auto: the newest complete checkpoint of run_dir (None in a fresh one); never:
    start fresh (refused where checkpoints exist); else a checkpoint or run directory."""
    if resume == "auto":
        return latest(run_dir)
    if resume == "never":
        if latest(run_dir) is not None:
            raise CheckpointError(f"resume=never but {run_dir} holds checkpoints; use "
                                  f"resume=auto or another run_dir")
        return None
    try:
        path = resolve(resume)
    except CheckpointError as e:
        raise CheckpointError(f"resume={resume} (auto, never, or a checkpoint): {e}") from e
    _refuse_older(run_dir, path)
    return path


def _refuse_older(run_dir: str | Path, path: Path) -> None:
    """Training on from a checkpoint older than run_dir's newest would start a second branch
    whose saves and retention replace the newer ones: refused rather than deleted silently."""
    step = read_state(path)["step"]
    newer = [d.name for d in checkpoint_dirs(run_dir) if step_of(d) > step]
    if newer:
        raise CheckpointError(
            f"resume={path} is at step {step} but {run_dir} holds newer checkpoints "
            f"({', '.join(newer)}); move them out of {Path(run_dir) / 'checkpoints'} to "
            f"continue from the older one, or resume into another run_dir")


def save(run_dir: str | Path, step: int, engine: Engine, state: dict, keep: int) -> Path:
    """Every rank calls this; the checkpoint appears (renamed into place) once all wrote."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("model", "optim"):  # megatron's writer wants its directories made
            (tmp / part).mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    _barrier()
    if parallel.is_main():
        if not any((tmp / "optim").iterdir()):
            (tmp / "optim").rmdir()
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, **engine.settings(), **state}, indent=2))
        publish_dir(tmp, final)  # fsyncs every file and directory, then the rename
        prune(run_dir, keep)
    _barrier()
    return final


def hf_state(path: Path) -> dict:
    """What a Hugging Face model directory stands for as a checkpoint: step 0, its own
    architecture and tokenizer, no data (`manifest` None) and the default run settings."""
    try:
        tokenizer = tok.load(path)
    except UserError as e:
        raise CheckpointError(f"checkpoint {path}: a Hugging Face model needs its tokenizer "
                              f"files beside config.json ({e})") from e
    return {"step": 0, "model": hf.model_config(path).resolved(), "hf_model": str(path),
            "tokenizer": {"path": str(path.resolve()), "hash": tokenizer.hash},
            "manifest": None, "config": {"eval": to_dict(EvalConfig()),
                                         "opt": to_dict(OptConfig())}}


def read_state(path: Path) -> dict:
    if hf.is_hf_model(path):
        return hf_state(path)
    if not (path / "model").is_dir():
        raise CheckpointError(f"checkpoint {path}: no weights (model/ is missing)")
    if not (path / "state.json").exists():
        raise CheckpointError(f"checkpoint {path}: state.json is missing")
    try:
        return json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({e.msg})") from e


def check_model_config(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint of another architecture, naming the keys that differ (keys older
    checkpoints lack have their defaults)."""
    saved = load_dict(ModelConfig, saved).resolved()
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {v!r} here"
            for k, v in current.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} has another architecture: " + "; ".join(diff))


# what an engine's settings() may hold, and what checkpoints from before engine= imply
ENGINE_KEYS = ("engine", "distributed_optimizer", "deepspeed", "dp")
BEFORE_ENGINES = {"engine": "megatron", "distributed_optimizer": False}


@contextmanager
def _loading(path: Path) -> Iterator[None]:
    """A bad, missing or mismatched checkpoint as one CheckpointError naming it."""
    try:
        yield
    except (Exception, DistCheckpointException) as e:  # torch's is a BaseException
        if not unloadable(e):
            raise
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({_reason(e)})") from e


def load(path: Path, model: torch.nn.Module) -> dict:
    """A checkpoint's weights into a model built for the current layout; its state."""
    state = read_state(path)
    with _loading(path):
        load_weights(model, path)
    return state


def resume(path: Path, engine: Engine) -> dict:
    """Weights, the engine's state and the RNG, to continue training exactly; the state.
    The engine must be set up as the one that saved (optimizer states differ in kind)."""
    state = read_state(path)
    current = engine.settings()
    saved = {key: state[key] for key in ENGINE_KEYS if key in state}
    if "engine" not in saved:
        saved = {**BEFORE_ENGINES, **saved}
    if saved != current:
        raise CheckpointError(
            f"checkpoint {path}: saved with {_settings(saved)}, resumed with "
            f"{_settings(current)}; resume with the engine settings it was saved "
            f"with (and as many data-parallel ranks, for deepspeed)")
    with _loading(path):
        engine.load(path)
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return state


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _reason(error: BaseException) -> str:
    """One line: the error, or for torch's wrapper the errors it wraps (not their tracebacks)."""
    if isinstance(error, DistCheckpointException):
        return "; ".join(_reason(e) for e, _ in error.failures.values())
    text = str(error).strip().splitlines()
    if isinstance(error, EOFError) and not text:
        return "a file ends early: truncated"
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# What torch says of a state dict that does not fit the model, or of a damaged file
MISMATCH = ("Error(s) in loading state_dict", "size mismatch", "Missing key(s)",
            "Unexpected key(s)", "PytorchStreamReader failed", "metadata read failed")


def unloadable(error: BaseException) -> bool:
    """Whether an error while loading says the checkpoint is bad, missing or of another model
    (the user's to fix), rather than the machine failing (out of memory, NCCL) or a bug."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    if isinstance(error, CheckpointingException | EOFError | KeyError | FileNotFoundError |
                  pickle.UnpicklingError):
        return True
    if isinstance(error, DistCheckpointException):  # per-rank failures, wrapped
        return all(unloadable(e) for e, _ in error.failures.values())
    return (isinstance(error, RuntimeError | AssertionError)
            and any(m in str(error) for m in MISMATCH))


def _restore(path: Path, fast: FastPath) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint records, built for the current layout (with its LoRA adapters,
    if any), loaded; and its state."""
    state = read_state(path)
    model = build_model(load_dict(ModelConfig, state["model"]), fast, initialise=False)
    if state.get("hf_model"):
        hf.load_weights(model, path)
        return model, state
    if state.get("lora"):
        lora.apply(model, state["lora"]["rank"], state["lora"]["alpha"])
    load(path, model)
    return model, state


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as saved (LoRA adapters beside their frozen base weights)."""
    model, _ = _restore(path, OFF)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def load_model(path: Path, fast: FastPath = OFF) -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint holds, built for the current layout (a LoRA finetune's adapters
    folded in) and, to be trained, with the run's fast path; and its state."""
    model, state = _restore(path, fast)
    if state.get("lora"):
        lora.merge(model)
        model.requires_grad_(True)
    return model, state


def content_hash(path: Path) -> str:
    """sha256 of a checkpoint's weight files (names and bytes): what replay provenance records."""
    digest = hashlib.sha256()
    files = path.glob("*.safetensors") if hf.is_hf_model(path) else (path / "model").rglob("*")
    for file in sorted(p for p in files if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
