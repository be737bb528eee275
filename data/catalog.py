"""Resolve `data=` (a built-in corpus, a local source, or a prepared manifest) to shards.

A source is prepared once into the cache, as `data/<name>-L<seq_len>-<key[:12]>`, where the
key is a hash of the source's resolved files, their contents and every preparation setting
(shards.fingerprint_of), so an edited file or another setting gets its own entry. A cache
entry (prepared shards, the built-in tokenizer) is made once: under an exclusive file lock
beside it (`<entry>.lock`), so unrelated processes sharing a cache are safe, and under
torch.distributed by each node's local rank 0 while the other ranks wait.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from forgetless.config import ConfigError, DataConfig
from forgetless.data import tokenizer as tok
from forgetless.data.shards import (
    DataError,
    Manifest,
    cache_key,
    fingerprint_of,
    load_manifest,
    prepare,
)
from forgetless.data.sources import BUILTIN, source_name
from forgetless.errors import UserError

# data_opts keys that only matter when a source is prepared (ignored for a manifest)
PREPARE_OPTIONS = ("text_field", "valid_fraction", "shard_sequences")


def is_manifest(data: str) -> bool:
    path = Path(data)
    return path.name.endswith(".json") or (path.is_dir() and (path / "manifest.json").exists())


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """An exclusive flock on `<entry>.lock`, held while the block runs (the kernel drops it
    if the process dies)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(f"{entry.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _shared() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _make(entry: Path, ready: Callable[[], bool], make: Callable[[], object]) -> None:
    """Under the entry's lock: make it unless another process has meanwhile."""
    with entry_lock(entry):
        if not ready():
            make()


def prepare_once(entry: Path, ready: Callable[[], bool], make: Callable[[], object]) -> None:
    """Make a cache entry unless `ready()`, once. Under torch.distributed every rank calls this:
    node-local rank 0 makes it while the others wait; a failure is raised on every rank."""
    if not _shared():
        _make(entry, ready, make)
        return
    failure: Exception | None = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            _make(entry, ready, make)
        except Exception as e:  # re-raised below, once every rank knows
            failure = e
    outcomes: list = [None] * dist.get_world_size()
    report = None if failure is None else (isinstance(failure, UserError), str(failure))
    dist.all_gather_object(outcomes, report)
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            user, message = outcome
            error = DataError if user else RuntimeError
            raise error(f"preparing {entry} failed on rank {rank}: {message}")


def builtin_tokenizer(cache_dir: str | Path, vocab: int) -> tok.AnyTokenizer:
    """The default tokenizer: BPE trained on both built-in corpora, with both domain tokens
    and the generic one (v2: tokenizers before it had no generic token)."""
    path = Path(cache_dir) / "tokenizers" / f"builtin-v2-{vocab}"
    prepare_once(path, (path / "tokenizer.json").exists,
                 functools.partial(_train_builtin, path, vocab))
    return tok.load(path)


def _train_builtin(path: Path, vocab: int) -> None:
    print(f"training the built-in tokenizer (vocab {vocab}) into {path}")
    tok.train(list(BUILTIN), path, vocab)


def load_tokenizer(spec: str, cache_dir: str | Path, vocab: int) -> tok.AnyTokenizer:
    return builtin_tokenizer(cache_dir, vocab) if spec == "builtin" else tok.load(spec)


def check_unused_options(manifest: Manifest, opts: DataConfig) -> None:
    """A preparation option set for a prepared manifest would do nothing: an error naming it.
    A tokenizer is accepted when it is the manifest's own (finetune passes its base's)."""
    defaults = DataConfig()
    for key in PREPARE_OPTIONS:
        if getattr(opts, key) != getattr(defaults, key):
            raise ConfigError(
                f"data_opts.{key}: data= is a prepared manifest ({manifest.path}), already cut "
                f"with its own {key}; drop data_opts.{key}, or pass the source to prepare it")
    if opts.tokenizer != defaults.tokenizer:
        try:
            given = tok.load(opts.tokenizer)
        except tok.TokenizerError as e:
            raise ConfigError(f"data_opts.tokenizer: {e}") from e
        if given.hash != manifest.tokenizer_hash:
            raise ConfigError(
                f"data_opts.tokenizer: data= is a prepared manifest ({manifest.path}); its "
                f"tokenizer is the one it was prepared with ({manifest.tokenizer_hash[:12]}), "
                f"not {opts.tokenizer} ({given.hash[:12]})")


def cached(data: str, cache_dir: str | Path, tokenizer: tok.AnyTokenizer, seq_len: int,
           opts: DataConfig, name: str) -> Manifest:
    """The cache entry of a source prepared with these settings, prepared once if missing."""
    fingerprint = fingerprint_of(data, tokenizer, seq_len, name, opts.valid_fraction,
                                 opts.shard_sequences, opts.text_field)
    out = Path(cache_dir) / "data" / f"{name}-L{seq_len}-{cache_key(fingerprint)[:12]}"
    prepare_once(out, (out / "manifest.json").exists,
                 functools.partial(_prepare_entry, data, out, tokenizer, seq_len, name, opts,
                                   fingerprint))
    return load_manifest(out)


def _prepare_entry(data: str, out: Path, tokenizer: tok.AnyTokenizer, seq_len: int, name: str,
                   opts: DataConfig, fingerprint: dict) -> None:
    print(f"preparing {data} into {out}")
    prepare(data, out, tokenizer, seq_len, name, opts.valid_fraction, opts.shard_sequences,
            opts.text_field, fingerprint=fingerprint)


def resolve(
    data: str, cache_dir: str | Path, seq_len: int, vocab: int, opts: DataConfig, name: str = ""
) -> tuple[tok.AnyTokenizer, Manifest]:
    """Tokenizer and manifest for `data`, checked against the model's seq_len and vocab. Every
    rank calls it (after parallel.init); preparation happens once."""
    if is_manifest(data):
        manifest = load_manifest(data)
        check_unused_options(manifest, opts)
        tokenizer = tok.load(manifest.data["tokenizer"]["path"])
    else:
        tokenizer = load_tokenizer(opts.tokenizer, cache_dir, vocab)
        manifest = cached(data, cache_dir, tokenizer, seq_len, opts, name or source_name(data))
    manifest.check(seq_len=seq_len, tokenizer_hash=tokenizer.hash)
    # a Hugging Face model's embedding may have more rows than its tokenizer has ids (padding)
    padded_ok = isinstance(tokenizer, tok.HFTokenizer) and tokenizer.vocab_size <= vocab
    if tokenizer.vocab_size != vocab and not padded_ok:
        raise DataError(
            f"tokenizer {tokenizer.path} has vocab {tokenizer.vocab_size} but model.vocab={vocab}"
        )
    return tokenizer, manifest
