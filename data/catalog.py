"""Resolve `data=` (a built-in corpus, a local source, or a prepared manifest) to shards.

Sources are prepared once into the cache, keyed by name, seq_len and tokenizer hash.
"""

from __future__ import annotations

from pathlib import Path

from forgetless.config import DataConfig
from forgetless.data import tokenizer as tok
from forgetless.data.shards import DataError, Manifest, load_manifest, prepare
from forgetless.data.sources import BUILTIN, source_name


def is_manifest(data: str) -> bool:
    path = Path(data)
    return path.name.endswith(".json") or (path.is_dir() and (path / "manifest.json").exists())


def builtin_tokenizer(cache_dir: str | Path, vocab: int) -> tok.Tokenizer:
    """The default tokenizer: BPE trained on both built-in corpora, with both domain tokens."""
    path = Path(cache_dir) / "tokenizers" / f"builtin-v{vocab}"
    if (path / "tokenizer.model").exists():
        return tok.load(path)
    print(f"training the built-in tokenizer (vocab {vocab}) into {path}")
    return tok.train(list(BUILTIN), path, vocab)


def load_tokenizer(spec: str, cache_dir: str | Path, vocab: int) -> tok.Tokenizer:
    return builtin_tokenizer(cache_dir, vocab) if spec == "builtin" else tok.load(spec)


def resolve(
    data: str, cache_dir: str | Path, seq_len: int, vocab: int, opts: DataConfig, name: str = ""
) -> tuple[tok.Tokenizer, Manifest]:
    """Tokenizer and manifest for `data`, checked against the model's seq_len and vocab."""
    if is_manifest(data):
        manifest = load_manifest(data)
        tokenizer = tok.load(manifest.data["tokenizer"]["path"])
    else:
        tokenizer = load_tokenizer(opts.tokenizer, cache_dir, vocab)
        name = name or source_name(data)
        out = Path(cache_dir) / "data" / f"{name}-L{seq_len}-{tokenizer.hash[:12]}"
        if (out / "manifest.json").exists():
            manifest = load_manifest(out)
        else:
            print(f"preparing {data} into {out}")
            manifest = prepare(data, out, tokenizer, seq_len, name, opts.valid_fraction,
                               opts.shard_sequences, opts.text_field)
    manifest.check(seq_len=seq_len, tokenizer_hash=tokenizer.hash)
    if tokenizer.vocab_size != vocab:
        raise DataError(
            f"tokenizer {tokenizer.path} has vocab {tokenizer.vocab_size} but model.vocab={vocab}"
        )
    return tokenizer, manifest
