"""Token shards: WebDataset tars of packed fixed-length sequences, plus a JSON manifest.

Every sequence is `seq_len` tokens and starts with its dataset's first token (its domain token,
or a Hugging Face tokenizer's BOS; the manifest's first_token); documents are joined with EOS
and packed across sequence boundaries (the last partial sequence is dropped). Tokens are
uint16 while the vocabulary fits, else uint32 (the manifest's dtype; readers take the .npy's).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from forgetless.atomic import atomic_write_bytes, atomic_write_text, publish_dir, tmp_name
from forgetless.data import sources
from forgetless.data.sources import documents, is_valid
from forgetless.data.tokenizer import AnyTokenizer
from forgetless.errors import UserError

FORMAT = "forgetless-shards/1"
# Bump when the same inputs would give other shards (document splitting, packing, ids,
# the index beside each shard).
PREPARE_VERSION = 3
SPLITS = ("train", "valid")
ENCODE_BATCH = 256
# Manifest fields, checked on load: name -> (type, what it must be); the optional ones may be
# absent (replay manifests and older data lack some).
NUMBER = (int, float)
KINDS = {int: "an integer", str: "a string", dict: "an object", list: "a list",
         NUMBER: "a number"}
REQUIRED = {"name": str, "seq_len": int, "domain_token": int, "tokenizer": dict,
            "train": dict, "valid": dict}
OPTIONAL = {"eos_token": int, "dtype": str, "first_token": int, "domain_piece": str,
            "unigram_entropy": NUMBER,
            "documents": int, "source": str, "provenance": dict, "kind": str, "key": str,
            "fingerprint": dict, "seconds": NUMBER}
TOKENIZER_FIELDS = {"path": str, "hash": str, "vocab": int}
SPLIT_FIELDS = {"shards": list, "sequences": int, "tokens": int}
SHARD_FIELDS = {"path": str, "sequences": int}
# What a bad tar or .npy member raises while reading (anything else is not the shard's fault).
SHARD_ERRORS = (tarfile.TarError, EOFError, ValueError)


class DataError(UserError):
    """Shards or a manifest are missing, corrupt or do not match; the message names the file."""


@dataclass
class Manifest:
    path: Path
    data: dict

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def tokenizer_hash(self) -> str:
        return self.data["tokenizer"]["hash"]

    @property
    def domain_token(self) -> int:
        return self.data["domain_token"]

    def shards(self, split: str) -> list[tuple[Path, int]]:
        return [(self.path.parent / s["path"], s["sequences"]) for s in self.data[split]["shards"]]

    def sequences(self, split: str) -> int:
        return self.data[split]["sequences"]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def unigram_entropy(self) -> float | None:
        """Nats per token of a context-free model on the train split; None if not recorded."""
        return self.data.get("unigram_entropy")

    def check(self, seq_len: int | None = None, tokenizer_hash: str | None = None) -> None:
        if seq_len is not None and self.seq_len != seq_len:
            raise DataError(
                f"manifest {self.path}: shards have seq_len {self.seq_len} but the model has "
                f"model.seq_len={seq_len}; prepare the data again with seq_len={seq_len}"
            )
        if tokenizer_hash is not None and self.tokenizer_hash != tokenizer_hash:
            raise DataError(
                f"manifest {self.path}: shards were tokenized with tokenizer "
                f"{self.tokenizer_hash[:12]}, not with {tokenizer_hash[:12]}"
            )


def _check_fields(path: Path, record: object, fields: dict, where: str,
                  required: bool = True) -> None:
    """Each field present (if required) and of its type; a DataError names the field."""
    if not isinstance(record, dict):
        raise DataError(f"manifest {path}: {where.rstrip('.') or 'the file'} must be an object")
    for key, kind in fields.items():
        if key not in record:
            if required:
                raise DataError(f"manifest {path}: field {where}{key} is missing")
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise DataError(f"manifest {path}: field {where}{key} must be {KINDS[kind]}, "
                            f"not {json.dumps(value)[:40]}")


def validate(path: Path, data: object) -> None:
    """A manifest's fields, once on load, so a missing one is named rather than a KeyError."""
    _check_fields(path, data, REQUIRED, "")
    _check_fields(path, data, OPTIONAL, "", required=False)
    _check_fields(path, data["tokenizer"], TOKENIZER_FIELDS, "tokenizer.")
    for split in SPLITS:
        _check_fields(path, data[split], SPLIT_FIELDS, f"{split}.")
        for i, shard in enumerate(data[split]["shards"]):
            _check_fields(path, shard, SHARD_FIELDS, f"{split}.shards[{i}].")
    if data["seq_len"] < 2:
        raise DataError(f"manifest {path}: field seq_len must be at least 2, not {data['seq_len']}")


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise DataError(f"manifest {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"manifest {path}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise DataError(f"manifest {path}: format is {found!r}, expected {FORMAT}")
    validate(path, data)
    manifest = Manifest(path, data)
    for split in SPLITS:
        for shard, _ in manifest.shards(split):
            if not shard.exists():
                raise DataError(f"manifest {path}: shard {shard} is missing")
    return manifest


def token_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)


def index_path(shard: Path) -> Path:
    """A shard's index (see data/samples.py): [sequences, 2] int64, the byte offset and size
    of each sample's tokens.npy member."""
    return shard.with_name(shard.name + ".idx")


def scan_index(shard: Path) -> np.ndarray:
    """A shard's index, from walking its tar (reading it whole)."""
    try:
        with tarfile.open(shard) as tar:
            rows = [(m.offset_data, m.size) for m in tar if m.name.endswith(".tokens.npy")]
    except SHARD_ERRORS as e:
        raise DataError(f"shard {shard}: corrupt or truncated ({type(e).__name__}: {e})") from e
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def write_shard(path: Path, sequences: Iterable[np.ndarray], first_key: int = 0,
                meta: Callable[[int], dict] | None = None, dtype: np.dtype = np.uint16) -> int:
    """Write sequences (as `dtype`) to a tar under a temporary name, index it, then rename;
    returns the count (a shard under its name always has its index).

    `meta(i)` may add a JSON record to sample i (replay provenance)."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with wds.TarWriter(str(tmp)) as writer:
        for i, seq in enumerate(sequences):
            sample = {"__key__": f"{first_key + i:010d}", "tokens.npy": seq.astype(dtype)}
            if meta is not None:
                sample["meta.json"] = meta(first_key + i)
            writer.write(sample)
            count += 1
    buffer = io.BytesIO()
    np.save(buffer, scan_index(tmp))
    atomic_write_bytes(index_path(path), buffer.getvalue())
    os.replace(tmp, path)
    return count


class _SplitWriter:
    """Packs token streams of one split into sequences and shards."""

    def __init__(self, out: Path, split: str, seq_len: int, domain: int, shard_sequences: int,
                 vocab: int):
        self.out, self.split, self.seq_len, self.domain = out, split, seq_len, domain
        self.shard_sequences, self.dtype = shard_sequences, token_dtype(vocab)
        self.rest = np.zeros(0, dtype=np.int64)  # tokens not yet in a sequence (< seq_len - 1)
        self.pending: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.total = 0
        self.counts = np.zeros(vocab, dtype=np.int64)  # unigram counts of the written tokens

    def add(self, ids: list[int], eos: int) -> None:
        """Append a document and its EOS, cutting off every full sequence: linear in the
        tokens, however long the document."""
        stream = np.concatenate([self.rest, np.asarray(ids, dtype=np.int64), [eos]])
        body = self.seq_len - 1
        n = len(stream) // body
        block = np.empty((n, self.seq_len), dtype=self.dtype)
        block[:, 0] = self.domain
        block[:, 1:] = stream[: n * body].reshape(n, body)
        self.rest = stream[n * body:]
        for seq in block:
            self.pending.append(seq)
            if len(self.pending) == self.shard_sequences:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            tokens = np.stack(self.pending)[:, 1:].ravel()
            self.counts += np.bincount(tokens, minlength=len(self.counts))
            name = f"{self.split}-{len(self.shards):06d}.tar"
            count = write_shard(self.out / name, self.pending, first_key=self.total,
                                dtype=self.dtype)
            self.shards.append({"path": name, "sequences": count})
            self.total += count
            self.pending = []

    def summary(self) -> dict:
        self.flush()
        return split_summary(self.shards, self.seq_len)


def split_summary(shards: list[dict], seq_len: int) -> dict:
    total = sum(s["sequences"] for s in shards)
    return {"shards": shards, "sequences": total, "tokens": total * seq_len}


def write_manifest(out: Path, name: str, seq_len: int, domain: int, tokenizer: AnyTokenizer,
                   splits: dict, **extra) -> None:
    manifest = {
        "format": FORMAT,
        "name": name,
        "seq_len": seq_len,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "domain_token": domain,
        "first_token": domain,
        "domain_piece": tokenizer.piece(domain),
        "eos_token": tokenizer.eos_id,
        "tokenizer": {"path": str(tokenizer.path.resolve()), "hash": tokenizer.hash,
                      "vocab": tokenizer.vocab_size},
        **extra,
        **splits,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the token unigram distribution: the loss a context-free model gets."""
    if counts.sum() == 0:
        return math.nan
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def fingerprint_of(source: str, tokenizer: AnyTokenizer, seq_len: int, name: str,
                   valid_fraction: float, shard_sequences: int, text_field: str) -> dict:
    """Everything prepared shards depend on: the source's files and their contents (see
    sources.fingerprint) and every preparation setting."""
    return {"version": PREPARE_VERSION, "format": FORMAT, "source": sources.fingerprint(source),
            "name": name, "seq_len": seq_len, "tokenizer": tokenizer.hash,
            "valid_fraction": valid_fraction, "text_field": text_field,
            "shard_sequences": shard_sequences}


def cache_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: AnyTokenizer,
    seq_len: int,
    name: str,
    valid_fraction: float = 0.05,
    shard_sequences: int = 8192,
    text_field: str = "text",
    fingerprint: dict | None = None,
) -> Manifest:
    """Tokenize a source into train/valid shards under out_dir, atomically. The manifest
    records the fingerprint (computed unless given) and its key."""
    out = Path(out_dir)
    domain = tokenizer.domain_id(name)
    fingerprint = fingerprint or fingerprint_of(source, tokenizer, seq_len, name,
                                                valid_fraction, shard_sequences, text_field)
    stage = tmp_name(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        writers = {s: _SplitWriter(stage, s, seq_len, domain, shard_sequences,
                                   tokenizer.vocab_size) for s in SPLITS}
        n_docs = 0
        start = time.time()
        bar = tqdm(desc=f"tokenizing {name}", unit=" doc", mininterval=1.0)
        for batch in _batched(documents(source, text_field), ENCODE_BATCH):
            encoded = tokenizer.encode_batch([text for _, text in batch])
            for (doc_id, _), ids in zip(batch, encoded, strict=True):
                split = "valid" if is_valid(doc_id, valid_fraction) else "train"
                writers[split].add(ids, tokenizer.eos_id)
            n_docs += len(batch)
            bar.update(len(batch))
        bar.close()
        if n_docs == 0:
            raise DataError(f"source {source}: empty corpus (no documents)")
        splits = {s: w.summary() for s, w in writers.items()}
        for split, summary in splits.items():
            if summary["sequences"] == 0:
                raise DataError(
                    f"source {source}: no {split} sequence of seq_len {seq_len} from "
                    f"{n_docs} documents; add text, or lower seq_len or raise valid_fraction"
                )
        write_manifest(stage, name, seq_len, domain, tokenizer, splits, source=source,
                       key=cache_key(fingerprint), fingerprint=fingerprint, documents=n_docs,
                       unigram_entropy=unigram_entropy(writers["train"].counts),
                       seconds=round(time.time() - start, 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return load_manifest(out)
