"""`forgetless generate`: self-generated replay from a checkpoint into WebDataset shards.

Shard k holds sample ids [first_id + k * shard_samples, ...); data-parallel ranks take every
world-th shard (tensor-parallel peers sample together; the first writes). A finished shard
is never rewritten, so an interrupted run resumes where it stopped, and since a sample's
tokens depend only on (seed, id) the result is the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from forgetless import checkpoint, config, parallel
from forgetless.atomic import atomic_write_text
from forgetless.config import GenerateConfig, to_dict
from forgetless.data import tokenizer as tok
from forgetless.data.shards import (
    DataError,
    load_manifest,
    split_summary,
    token_dtype,
    write_manifest,
    write_shard,
)
from forgetless.sampler import generate

PLAN = "generation.json"


def _plan(cfg: GenerateConfig, path: Path, state: dict, domain: int) -> dict:
    return {
        "checkpoint": str(path.resolve()),
        "checkpoint_hash": parallel.from_main(lambda: checkpoint.content_hash(path)),
        "seed": cfg.seed,
        "sampling": to_dict(cfg.sampling),
        "sample_ids": [cfg.first_id, cfg.first_id + cfg.samples],
        "shard_samples": cfg.shard_samples,
        "first_token": domain,
        "seq_len": state["model"]["seq_len"],
    }


def _check_plan(out: Path, plan: dict) -> None:
    path = out / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise DataError(f"generate: {out} holds replay made with other settings "
                            f"({', '.join(diff)} differ); choose another out= or remove it")
    elif parallel.is_main():
        atomic_write_text(path, json.dumps(plan, indent=2))


def run(cfg: GenerateConfig) -> dict:
    config.require(cfg, "checkpoint", "out")
    path = checkpoint.resolve(cfg.checkpoint)
    state = checkpoint.read_state(path)
    parallel.init(cfg.seed, cfg.threads, cfg.parallel.tp)
    model, _ = checkpoint.load_model(path)
    tokenizer = tok.load(state["tokenizer"]["path"])
    # samples start as the training data did: its domain token, or a Hugging Face model's BOS
    source = load_manifest(state["manifest"]) if state["manifest"] else None
    first_token = source.domain_token if source else tokenizer.domain_id("")
    name = source.name if source else path.resolve().name
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(cfg, path, state, first_token)
    _check_plan(out, plan)
    seq_len = plan["seq_len"]

    if dist.get_world_size() > 1:  # every rank sees the same finished shards
        dist.barrier()
    starts = range(cfg.first_id, cfg.first_id + cfg.samples, cfg.shard_samples)
    names = [f"replay-{i:06d}.tar" for i in range(len(starts))]
    mine = [(k, s) for k, s in enumerate(starts)
            if k % parallel.dp_size() == parallel.dp_rank() and not (out / names[k]).exists()]
    todo = sum(min(cfg.shard_samples, cfg.first_id + cfg.samples - s) for _, s in mine)
    bar = tqdm(total=todo * seq_len, unit="tok", unit_scale=True, desc="generating replay",
               disable=not parallel.is_main())
    start = time.perf_counter()
    for k, first in mine:
        ids = torch.arange(first, min(first + cfg.shard_samples, cfg.first_id + cfg.samples))
        sequences = []
        for batch in ids.split(cfg.batch_size):
            sequences.append(generate(model, first_token, batch, seq_len, cfg.seed,
                                      **to_dict(cfg.sampling), **to_dict(cfg.kernels)))
            bar.update(batch.numel() * seq_len)
        if parallel.tp_rank():  # tensor-parallel peers sampled the same tokens
            continue
        dtype = token_dtype(tokenizer.vocab_size)
        tokens = torch.cat(sequences).cpu().numpy().astype(dtype)
        write_shard(out / names[k], tokens, first_key=first, dtype=dtype,
                    meta=lambda i: {"sample_id": i, "seed": cfg.seed,
                                    "checkpoint_hash": plan["checkpoint_hash"],
                                    **to_dict(cfg.sampling)})
    bar.close()
    seconds = time.perf_counter() - start
    if dist.is_initialized():
        dist.barrier()
    shards = [{"path": n, "sequences": min(cfg.shard_samples, cfg.first_id + cfg.samples - s)}
              for n, s in zip(names, starts, strict=True)]
    if parallel.is_main():
        splits = {"train": split_summary(shards, seq_len), "valid": split_summary([], seq_len)}
        write_manifest(out, name, seq_len, first_token, tokenizer, splits,
                       kind="replay", source=f"self-generated from {path}", provenance=plan)
    return {"manifest": str(out / "manifest.json"), "samples": cfg.samples,
            "generated_tokens": todo * seq_len,
            "tokens_per_s": todo * seq_len / seconds if todo else None}
