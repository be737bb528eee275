"""`forgetless evaluate`: validation next-token loss of a checkpoint."""

from __future__ import annotations

from forgetless import checkpoint, config, parallel
from forgetless.config import EvaluateConfig, PretrainConfig
from forgetless.data import tokenizer as tok
from forgetless.data.shards import load_manifest
from forgetless.model import build_model
from forgetless.train import evaluate


def run(cfg: EvaluateConfig) -> dict:
    path = checkpoint.resolve(cfg.checkpoint)
    state = checkpoint.read_state(path)
    train_cfg = config.load_dict(PretrainConfig, state["config"])
    parallel.init(train_cfg.seed)
    model = build_model(train_cfg.model)
    checkpoint.load(path, model)
    manifest = load_manifest(cfg.data or state["manifest"])
    manifest.check(seq_len=train_cfg.model.seq_len, tokenizer_hash=state["tokenizer"]["hash"])
    tok.load(state["tokenizer"]["path"])  # the tokenizer must still be there and unchanged
    max_sequences = cfg.max_sequences or (
        train_cfg.eval.max_sequences if not cfg.data else 0)
    loss = evaluate(model, manifest, train_cfg.opt.batch_size, max_sequences)
    return {"checkpoint": str(path), "step": state["step"], "data": str(manifest.path),
            "valid_ntp": loss}
