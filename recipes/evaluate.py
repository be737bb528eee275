"""`forgetless evaluate`: validation next-token loss of a checkpoint."""

from __future__ import annotations

from forgetless import checkpoint, config, parallel
from forgetless.config import ConfigError, EvaluateConfig
from forgetless.data import tokenizer as tok
from forgetless.data.shards import load_manifest
from forgetless.evaluation import eval_set, evaluate


def run(cfg: EvaluateConfig) -> dict:
    config.require(cfg, "checkpoint")
    path = checkpoint.resolve(cfg.checkpoint)
    state = checkpoint.read_state(path)
    parallel.init(0)
    if not (cfg.data or state["manifest"]):
        raise ConfigError(f"data: is required: {path} is a Hugging Face model, which records "
                          f"no validation data (give a manifest tokenized with its tokenizer)")
    model, _ = checkpoint.load_model(path)
    manifest = load_manifest(cfg.data or state["manifest"])
    manifest.check(seq_len=state["model"]["seq_len"], tokenizer_hash=state["tokenizer"]["hash"])
    tok.load(state["tokenizer"]["path"])  # the tokenizer must still be there and unchanged
    eval_cfg = state["config"]["eval"]
    max_sequences = cfg.max_sequences or (0 if cfg.data else eval_cfg["max_sequences"])
    batches = eval_set(manifest, state["config"]["opt"]["batch_size"], max_sequences)
    scores = evaluate(model, batches)
    return {"checkpoint": str(path), "step": state["step"], "data": str(manifest.path),
            **{f"valid_{k}": v for k, v in scores.items()}}
