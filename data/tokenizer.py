"""sentencepiece BPE tokenizer with one reserved domain-marker token per dataset, and EOS.

Every tokenizer trained here also has the generic first token `<|text|>`, which starts the
sequences of a dataset it has no own token for (a user's data on the built-in tokenizer).
Saved as `tokenizer.model` plus `tokenizer.json` (content hash, vocab, domain ids, generic id,
sources); the hash is what manifests and checkpoints record to catch mismatches.

A Hugging Face tokenizer directory (tokenizer_config.json beside tokenizer.json) loads as an
`HFTokenizer` with the same interface: it has no domain markers, so its sequences start with
its BOS (EOS where it has none), as the paper does for Llama. `export_hf` writes either kind in
the form transformers' AutoTokenizer loads, the sentencepiece one with identical ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

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

    @property
    def bos_id(self) -> int | None:
        return None  # sequences start with a domain token instead

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "chat_template.jinja")


@dataclass
class HFTokenizer:
    """A Hugging Face tokenizer behind the sentencepiece Tokenizer's interface."""

    hf: PreTrainedTokenizerBase
    path: Path
    hash: str
    domains: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    def piece(self, token: int) -> str:
        return self.hf.convert_ids_to_tokens(int(token))

    def domain_id(self, name: str) -> int:
        """Every dataset's first token: BOS, or EOS for a tokenizer without one."""
        return self.eos_id if self.bos_id is None else self.bos_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


AnyTokenizer = Tokenizer | HFTokenizer


def is_hf_tokenizer(path: str | Path) -> bool:
    """A directory with Hugging Face tokenizer files (forgetless's own has tokenizer.model and
    its metadata in tokenizer.json, but no tokenizer_config.json)."""
    return (Path(path) / "tokenizer_config.json").is_file()


def load_hf(path: str | Path) -> HFTokenizer:
    path = Path(path)
    digest = hashlib.sha256()
    for name in HF_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"tokenizer {path}: transformers cannot load it ({e})") from e
    if hf.eos_token_id is None:
        raise TokenizerError(f"tokenizer {path}: has no EOS token (eos_token in "
                             f"tokenizer_config.json), which joins documents")
    return HFTokenizer(hf=hf, path=path, hash=digest.hexdigest())


def export_hf(tokenizer: AnyTokenizer, out_dir: str | Path,
              bos_token: str | None = None) -> list[str]:
    """Files AutoTokenizer loads into `out_dir` (names returned): a Hugging Face tokenizer as
    it is; a sentencepiece one converted by transformers' own SentencePiece converter, which
    follows the model's normalizer settings, so the ids are identical. bos_token: the piece
    sequences start with (the data's domain token)."""
    out = Path(out_dir)
    if isinstance(tokenizer, HFTokenizer):
        return [Path(f).name for f in tokenizer.hf.save_pretrained(out)]
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    vocab = {tokenizer.piece(i): i for i in range(tokenizer.vocab_size)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=SpmConverter.build_tokenizer_from_spm_proto(proto, vocab),
        eos_token=tokenizer.piece(EOS_ID), unk_token=tokenizer.piece(UNK_ID),
        bos_token=bos_token, additional_special_tokens=[
            domain_piece(d) for d in tokenizer.domains] + (
            [GENERIC_PIECE] if tokenizer.generic is not None else []))
    return [Path(f).name for f in fast.save_pretrained(out)]


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


def load(path: str | Path) -> AnyTokenizer:
    """A forgetless tokenizer (its directory or tokenizer.model) or a Hugging Face one."""
    path = Path(path)
    if is_hf_tokenizer(path):
        return load_hf(path)
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
