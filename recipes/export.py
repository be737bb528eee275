"""`forgetless export`: a checkpoint as a Hugging Face model directory.

One process loads the checkpoint whatever TP/PP layout saved it (megatron's distributed
checkpoints reshard on load), LoRA adapters folded in, and writes into a hidden directory that
replaces `out` in one step once complete: config.json, safetensors (sharded past
max_shard_size, with their index), generation_config.json, the tokenizer, and a model card
recording where the weights come from and how much the run forgot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from forgetless import checkpoint, config, hf, metrics, parallel
from forgetless.atomic import publish_dir, tmp_name
from forgetless.config import ExportConfig
from forgetless.data import tokenizer as tok
from forgetless.data.shards import load_manifest
from forgetless.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(cfg: ExportConfig) -> dict:
    config.require(cfg, "checkpoint", "out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("export runs in one process (it reads any TP/PP layout): "
                        "start it without torchrun")
    path = checkpoint.resolve(cfg.checkpoint)
    state = checkpoint.read_state(path)
    parallel.init(0)
    model, state = checkpoint.load_model(path)
    model_cfg = config.load_dict(config.ModelConfig, state["model"])
    tokenizer = tok.load(state["tokenizer"]["path"])
    first = _first_token(state, tokenizer)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = _write(cfg, tmp, model, model_cfg, tokenizer, first)
        card = model_card(path, state, model_cfg, cfg.dtype)
        (tmp / "README.md").write_text(card)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {path} to {out}")
    return {"checkpoint": str(path), "out": str(out), "files": sorted([*files, "README.md"]),
            "dtype": cfg.dtype}


def _first_token(state: dict, tokenizer) -> int:
    """The token every training sequence started with: the data's domain token, or for a
    Hugging Face tokenizer its BOS; the exported model's bos_token_id."""
    if state.get("manifest"):
        return load_manifest(state["manifest"]).domain_token
    return tokenizer.domain_id("")


def _write(cfg: ExportConfig, out: Path, model: torch.nn.Module, model_cfg: config.ModelConfig,
           tokenizer, first: int) -> list[str]:
    dtype = DTYPES[cfg.dtype]
    hf_cfg = hf.hf_config(model_cfg, first, tokenizer.eos_id, cfg.dtype)  # refuses first
    tensors = {k: v.to(dtype).contiguous()
               for k, v in hf.hf_state_dict(model, model_cfg).items()}
    files = hf.save_weights(tensors, out, cfg.max_shard_size)
    hf_cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=first, eos_token_id=tokenizer.eos_id).save_pretrained(out)
    files += ["config.json", "generation_config.json"]
    return files + tok.export_hf(tokenizer, out, bos_token=tokenizer.piece(first))


def run_dir_of(path: Path) -> Path | None:
    """The run a checkpoint belongs to (run/checkpoints/step_N), None for a loose one."""
    return path.parent.parent if path.parent.name == "checkpoints" else None


def final_metrics(path: Path, step: int) -> dict:
    """The last evaluation at or before `step` of the checkpoint's run, and for a finetune its
    forgetting: prev_ntp now minus prev_ntp at step 0 (the base's)."""
    run = run_dir_of(path)
    if run is None or not (run / "metrics.jsonl").exists():
        return {}
    records = [r for r in metrics.read(run / "metrics.jsonl")
               if r.get("step", 0) <= step and "valid_ntp" in r]
    if not records:
        return {}
    final = records[-1]
    out = {k: final[k] for k in ("step", "tokens", "valid_ntp", "prev_ntp", "prev_kl")
           if final.get(k) is not None}
    if "prev_ntp" in out and records[0].get("step") == 0:
        out["prev_ntp_before"] = records[0]["prev_ntp"]
        out["forgetting"] = out["prev_ntp"] - records[0]["prev_ntp"]
    return out


def provenance(path: Path, state: dict) -> dict:
    """Where the weights come from: base, data, method and replay of the run that made them."""
    run_cfg = state.get("config", {})
    if state.get("hf_model"):
        return {"imported from": state["hf_model"]}
    about = {"checkpoint": str(path.resolve()), "step": state["step"],
             "tokens": state.get("tokens"), "data": state.get("manifest")}
    if "method" not in state:
        return {**about, "trained": "pretrained from scratch by forgetless"}
    replay = run_cfg.get("replay", {})
    return {**about, "base checkpoint": state.get("base_checkpoint"),
            "method": state["method"], "lam": run_cfg.get("lam"),
            "replay": replay.get("source", "none"), "replay data": replay.get("data") or None,
            "replay from another checkpoint": state.get("replay_foreign")}


def model_card(path: Path, state: dict, model_cfg: config.ModelConfig, dtype: str) -> str:
    """README.md of the exported model: provenance, forgetting metrics, architecture."""
    rows = [(k, v) for k, v in provenance(path, state).items() if v not in (None, "")]
    found = final_metrics(path, state["step"])
    lines = ["---", "library_name: transformers", "tags: [forgetless]", "---", "",
             f"# {Path(path).resolve().name}", "",
             "Exported by forgetless (`forgetless export`).", "", "## Provenance", "",
             "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
    if found:
        lines += ["## Final metrics", "",
                  "valid_ntp: next-token loss on the training data's validation split; prev_ntp: "
                  "on the previous distribution; forgetting: prev_ntp minus its value before "
                  "finetuning.", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                    for k, v in found.items()], ""]
    arch = model_cfg.resolved()
    lines += ["## Architecture", "", f"dtype {dtype}; " + ", ".join(
        f"{k}={v}" for k, v in arch.items() if k != "init_std"), ""]
    return "\n".join(lines)
