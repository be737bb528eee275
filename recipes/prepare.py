"""`forgetless data prepare` and `forgetless data tokenizer`: text to tokenizer and shards."""

from __future__ import annotations

from pathlib import Path

from forgetless.config import PrepareConfig, TokenizerConfig
from forgetless.data import catalog
from forgetless.data import tokenizer as tok
from forgetless.data.shards import prepare
from forgetless.data.sources import source_name


def run(cfg: PrepareConfig) -> dict:
    name = cfg.name or source_name(cfg.source)
    if not cfg.out:
        _, manifest = catalog.resolve(cfg.source, cfg.cache_dir, cfg.seq_len, cfg.vocab,
                                      cfg.data_opts, name=name)
    else:
        tokenizer = catalog.load_tokenizer(cfg.data_opts.tokenizer, cfg.cache_dir, cfg.vocab)
        manifest = prepare(cfg.source, Path(cfg.out), tokenizer, cfg.seq_len, name,
                           cfg.data_opts.valid_fraction, cfg.data_opts.shard_sequences,
                           cfg.data_opts.text_field)
    return {"manifest": str(manifest.path),
            **{k: manifest.data.get(k) for k in ("name", "seq_len", "domain_token",
                                                "domain_piece", "documents", "unigram_entropy")},
            "train_sequences": manifest.sequences("train"),
            "valid_sequences": manifest.sequences("valid")}


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    tokenizer = tok.train(list(cfg.sources), cfg.out, cfg.vocab, cfg.text_field,
                          list(cfg.domains) or None)
    return {"tokenizer": str(tokenizer.path), "hash": tokenizer.hash,
            "vocab": tokenizer.vocab_size, "domains": tokenizer.domains}
