import json

import pytest

from forgetless.data import tokenizer as tok


def test_round_trip_keeps_code_whitespace_and_unicode(tokenizer):
    text = 'def f(x):\n\tif x:\n        return "é 中文 🙂"  # two  spaces\n\n\r\nend'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_reserved_ids(tokenizer):
    assert tokenizer.vocab_size == 512
    assert tokenizer.eos_id == 1
    dom = tokenizer.domain_id("tiny")
    assert dom not in (0, 1)
    assert tokenizer.encode("<|tiny|>") == [dom]  # a marker is one token
    assert dom not in tokenizer.encode("plain text without markers")
    generic = tokenizer.domain_id("other")  # a dataset without its own token: the generic one
    assert generic == tokenizer.generic and generic not in (0, 1, dom)
    assert tokenizer.encode(tok.GENERIC_PIECE) == [generic]
    assert tok.load(tokenizer.path).generic == generic


def test_tokenizer_without_generic_token_names_its_domains(tokenizer, tmp_path):
    """A tokenizer saved before the generic token existed keeps the clear error."""
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    meta = json.loads(tokenizer.path.with_suffix(".json").read_text())
    del meta["generic"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    old = tok.load(tmp_path)
    assert old.generic is None and old.domain_id("tiny") == tokenizer.domain_id("tiny")
    with pytest.raises(tok.TokenizerError, match="no domain token for dataset 'other'.*tiny"):
        old.domain_id("other")


def test_saved_with_content_hash_and_reloads(tokenizer):
    again = tok.load(tokenizer.path)
    assert again.hash == tokenizer.hash and len(again.hash) == 64
    assert again.encode("hello world") == tokenizer.encode("hello world")


def test_missing_and_mismatched_tokenizer(tokenizer, tmp_path):
    with pytest.raises(tok.TokenizerError, match="no such file"):
        tok.load(tmp_path / "nope.model")
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(tokenizer.path.read_bytes() + b"x")
    (tmp_path / "tokenizer.json").write_text(tokenizer.path.with_suffix(".json").read_text())
    with pytest.raises(tok.TokenizerError, match="does not match"):
        tok.load(copy)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(tok.TokenizerError, match="tokenizer.json is missing"):
        tok.load(copy)
