"""Token shards: WebDataset tars of packed fixed-length sequences, plus a JSON manifest.

Every sequence is `seq_len` tokens and starts with its dataset's domain token; documents are
joined with EOS and packed across sequence boundaries (the last partial sequence is dropped).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from forgetless.atomic import atomic_write_text, publish_dir
from forgetless.data.sources import documents, is_valid
from forgetless.data.tokenizer import Tokenizer
from forgetless.errors import UserError

FORMAT = "forgetless-shards/1"
SPLITS = ("train", "valid")
ENCODE_BATCH = 256


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
    if data.get("format") != FORMAT:
        raise DataError(f"manifest {path}: format is {data.get('format')!r}, expected {FORMAT}")
    manifest = Manifest(path, data)
    for split in SPLITS:
        for shard, _ in manifest.shards(split):
            if not shard.exists():
                raise DataError(f"manifest {path}: shard {shard} is missing")
    return manifest


def write_shard(path: Path, sequences: Iterable[np.ndarray], first_key: int = 0,
                meta: Callable[[int], dict] | None = None) -> int:
    """Write sequences (uint16) to a tar under a temporary name, then rename; returns the count.

    `meta(i)` may add a JSON record to sample i (replay provenance)."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with wds.TarWriter(str(tmp)) as writer:
        for i, seq in enumerate(sequences):
            sample = {"__key__": f"{first_key + i:010d}", "tokens.npy": seq.astype(np.uint16)}
            if meta is not None:
                sample["meta.json"] = meta(first_key + i)
            writer.write(sample)
            count += 1
    os.replace(tmp, path)
    return count


class _SplitWriter:
    """Packs token streams of one split into sequences and shards."""

    def __init__(self, out: Path, split: str, seq_len: int, domain: int, shard_sequences: int):
        self.out, self.split, self.seq_len, self.domain = out, split, seq_len, domain
        self.shard_sequences = shard_sequences
        self.buffer: list[int] = []
        self.pending: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.total = 0
        self.counts = np.zeros(2**16, dtype=np.int64)  # unigram counts (train split)

    def add(self, ids: list[int], eos: int) -> None:
        self.buffer.extend(ids)
        self.buffer.append(eos)
        body = self.seq_len - 1
        while len(self.buffer) >= body:
            seq = np.array([self.domain, *self.buffer[:body]], dtype=np.uint16)
            del self.buffer[:body]
            np.add.at(self.counts, seq[1:], 1)
            self.pending.append(seq)
            if len(self.pending) == self.shard_sequences:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            count = write_shard(self.out / name, self.pending, first_key=self.total)
            self.shards.append({"path": name, "sequences": count})
            self.total += count
            self.pending = []

    def summary(self) -> dict:
        self.flush()
        return split_summary(self.shards, self.seq_len)


def split_summary(shards: list[dict], seq_len: int) -> dict:
    total = sum(s["sequences"] for s in shards)
    return {"shards": shards, "sequences": total, "tokens": total * seq_len}


def write_manifest(out: Path, name: str, seq_len: int, domain: int, tokenizer: Tokenizer,
                   splits: dict, **extra) -> None:
    manifest = {
        "format": FORMAT,
        "name": name,
        "seq_len": seq_len,
        "dtype": "uint16",
        "domain_token": domain,
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


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    name: str,
    valid_fraction: float = 0.05,
    shard_sequences: int = 8192,
    text_field: str = "text",
) -> Manifest:
    """Tokenize a source into train/valid shards under out_dir, atomically."""
    out = Path(out_dir)
    if tokenizer.vocab_size > 2**16:
        raise DataError(f"tokenizer {tokenizer.path}: vocab {tokenizer.vocab_size} > 65536")
    domain = tokenizer.domain_id(name)
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        writers = {s: _SplitWriter(stage, s, seq_len, domain, shard_sequences) for s in SPLITS}
        n_docs = 0
        start = time.time()
        bar = tqdm(desc=f"tokenizing {name}", unit=" doc", mininterval=1.0)
        for batch in _batched(documents(source, text_field), ENCODE_BATCH):
            encoded = tokenizer.sp.encode([text for _, text in batch])
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
                       documents=n_docs,
                       unigram_entropy=unigram_entropy(writers["train"].counts),
                       seconds=round(time.time() - start, 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return load_manifest(out)


def read_shard(path: Path, expected: int | None = None) -> Iterator[np.ndarray]:
    """Sequences of one shard in order; a corrupt or truncated tar is a DataError naming it."""
    n = 0
    try:
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            yield np.load(io.BytesIO(sample["tokens.npy"])).astype(np.int64)
            n += 1
    except Exception as e:  # tarfile.ReadError, OSError, numpy's ValueError, KeyError
        raise DataError(f"shard {path}: corrupt or truncated ({type(e).__name__}: {e})") from e
    if expected is not None and n != expected:
        raise DataError(f"shard {path}: holds {n} sequences, the manifest says {expected}")
