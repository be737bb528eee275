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


def tiny_hf_tokenizer(out, vocab_words=(), bos=True):
    """A word-level Hugging Face tokenizer saved to `out`: specials first, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "</s>", "<s>"] if bos else ["<unk>", "</s>"]
    words = specials + ["hello", "world", *vocab_words]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="</s>",
                            bos_token="<s>" if bos else None).save_pretrained(out)
    return out


def test_hugging_face_tokenizer_directory(tmp_path):
    hf = tok.load(tiny_hf_tokenizer(tmp_path / "hf"))
    assert isinstance(hf, tok.HFTokenizer)
    assert (hf.eos_id, hf.bos_id, hf.vocab_size) == (1, 2, 5)
    assert hf.domain_id("any dataset") == 2  # no domain markers: sequences start with BOS
    assert hf.encode("hello world") == [3, 4]  # no special tokens added
    assert hf.encode_batch(["world", "hello"]) == [[4], [3]]
    assert hf.piece(3) == "hello"
    no_bos = tok.load(tiny_hf_tokenizer(tmp_path / "no_bos", bos=False))
    assert no_bos.domain_id("x") == no_bos.eos_id
    assert no_bos.hash != hf.hash


def test_hugging_face_tokenizer_without_eos_is_refused(tmp_path):
    path = tiny_hf_tokenizer(tmp_path / "hf")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(tok.TokenizerError, match="no EOS") as error:
        tok.load(path)
    assert str(path) in str(error.value)


def test_export_hf_gives_the_sentencepiece_ids(tokenizer, corpus, tmp_path):
    from transformers import AutoTokenizer

    files = tok.export_hf(tokenizer, tmp_path, bos_token="<|tiny|>")
    assert "tokenizer.json" in files
    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:200]]
    texts += ["<|tiny|>x  y\t\n 12345 héllo ∑ 日本 🙂", "  leading", "trailing  ", ""]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:60]
        assert hf.decode(ids) == tokenizer.decode(ids)
    assert hf.bos_token_id == tokenizer.domain_id("tiny")
    assert hf.eos_token_id == tokenizer.eos_id
    # and the exported directory is itself a tokenizer forgetless loads, with the same ids
    again = tok.load(tmp_path)
    assert again.encode(texts[0]) == tokenizer.encode(texts[0])
