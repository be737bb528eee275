"""sentencepiece BPE tokenizer with one reserved domain-marker token per dataset, and EOS.

Every tokenizer trained here also has the generic first token `<|text|>`, which starts the
sequences of a dataset it has no own token for (a user's data on the built-in tokenizer).
Saved as `tokenizer.model` plus `tokenizer.json` (content hash, vocab, domain ids, generic id,
sources); the hash is what manifests and checkpoints record to catch mismatches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from forgetless.atomic import atomic_write_bytes, atomic_write_text
from forgetless.data.sources import documents, source_name
from forgetless.errors import UserError

UNK_ID, EOS_ID = 0, 1
CHUNK_CHARS = 2000  # training sentences: documents cut at line ends to about this size
MAX_TRAIN_SENTENCES = 300_000
GENERIC_PIECE = "<|text|>"


class TokenizerError(UserError):
    """A tokenizer is missing, corrupt, or does not match; the message names the file."""


def domain_piece(name: str) -> str:
    return f"<|{name}|>"


@dataclass
class Tokenizer:
    sp: spm.SentencePieceProcessor
    path: Path
    hash: str
    domains: dict[str, int]
    generic: int | None = None  # the generic first token's id; None in older tokenizers

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def domain_id(self, name: str) -> int:
        """The dataset's own marker token, else the generic one."""
        if name in self.domains:
            return self.domains[name]
        if self.generic is None:
            known = ", ".join(self.domains)
            raise TokenizerError(
                f"tokenizer {self.path}: no domain token for dataset {name!r} (it has: {known}); "
                "train a tokenizer that includes this dataset, or name the data after one of those"
            )
        return self.generic

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            if buf and len(buf) + len(line) > CHUNK_CHARS:
                yield buf
                buf = ""
            buf += line[: 4 * CHUNK_CHARS]
        if buf:
            yield buf


def train(
    sources: list[str], out_dir: str | Path, vocab: int, text_field: str = "text",
    domains: list[str] | None = None,
) -> Tokenizer:
    """Train BPE on the sources; domains default to one per source."""
    domains = domains or [source_name(s) for s in sources]
    markers = list(dict.fromkeys([*map(domain_piece, domains), GENERIC_PIECE]))
    texts = (text for spec in sources for _, text in documents(spec, text_field))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts),
            model_writer=model,
            vocab_size=vocab,
            model_type="bpe",
            # Exact round trip for code: keep whitespace and newlines as they are.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9999,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            pad_id=-1,
            user_defined_symbols=markers,
            max_sentence_length=4 * CHUNK_CHARS * 4,
            input_sentence_size=MAX_TRAIN_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"tokenizer training on {', '.join(sources)} failed: {e}") from e
    return save(model.getvalue(), out_dir, domains, sources)


def _piece_id(sp: spm.SentencePieceProcessor, piece: str) -> int | None:
    """The id of a piece the model has, else None (sentencepiece would answer unk)."""
    i = sp.piece_to_id(piece)
    return i if sp.id_to_piece(i) == piece else None


def save(model: bytes, out_dir: str | Path, domains: list[str], sources: list[str]) -> Tokenizer:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=model)
    meta = {
        "hash": hashlib.sha256(model).hexdigest(),
        "vocab": sp.vocab_size(),
        "eos_id": EOS_ID,
        "domains": {d: sp.piece_to_id(domain_piece(d)) for d in domains},
        "generic": _piece_id(sp, GENERIC_PIECE),
        "sources": sources,
    }
    atomic_write_bytes(out / "tokenizer.model", model)
    atomic_write_text(out / "tokenizer.json", json.dumps(meta, indent=2))
    return load(out / "tokenizer.model")


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise TokenizerError(f"tokenizer {path}: no such file")
    if not meta_path.exists():
        raise TokenizerError(f"tokenizer {path}: {meta_path.name} is missing beside it")
    model = path.read_bytes()
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer {meta_path}: invalid JSON ({e.msg})") from e
    digest = hashlib.sha256(model).hexdigest()
    if meta.get("hash") != digest:
        raise TokenizerError(
            f"tokenizer {path}: content hash {digest[:12]} does not match "
            f"{meta_path.name} ({str(meta.get('hash'))[:12]}); the files are from different runs"
        )
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError as e:
        raise TokenizerError(f"tokenizer {path}: cannot be read ({e})") from e
    return Tokenizer(sp=sp, path=path, hash=digest, domains=dict(meta["domains"]),
                     generic=meta.get("generic"))
