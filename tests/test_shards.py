import json
import shutil

import numpy as np
import pytest

from forgetless.data import shards
from forgetless.data.sources import documents, is_valid

from .conftest import SEQ_LEN


def _all(manifest, split):
    return [s for path, n in manifest.shards(split) for s in shards.read_shard(path, n)]


def test_round_trip(manifest, tokenizer, corpus):
    train, valid = _all(manifest, "train"), _all(manifest, "valid")
    assert len(train) == manifest.sequences("train") and len(valid) == manifest.sequences("valid")
    assert len(manifest.shards("train")) > 1
    dom = tokenizer.domain_id("tiny")
    assert all(len(s) == SEQ_LEN and s[0] == dom for s in train + valid)
    # the packed stream is the documents joined by EOS, cut every SEQ_LEN - 1 tokens
    stream = [t for s in train for t in s[1:]]
    expected = []
    for doc_id, text in documents(str(corpus)):
        if not is_valid(doc_id, 0.1):
            expected += tokenizer.encode(text) + [tokenizer.eos_id]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < SEQ_LEN - 1
    data = manifest.data
    assert data["seq_len"] == SEQ_LEN and data["tokenizer"]["hash"] == tokenizer.hash
    assert data["train"]["tokens"] == len(train) * SEQ_LEN
    assert 0 < data["unigram_entropy"] < np.log(tokenizer.vocab_size)
    assert not any(p.name.startswith(".") for p in manifest.path.parent.iterdir())


def test_corrupt_and_truncated_tar(manifest, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(manifest.path.parent, copy)
    m = shards.load_manifest(copy)
    path, n = m.shards("train")[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(shards.DataError, match=f"shard {path}"):
        list(shards.read_shard(path, n))
    path.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(shards.DataError, match=f"shard {path}: corrupt"):
        list(shards.read_shard(path, n))
    path.unlink()
    with pytest.raises(shards.DataError, match="is missing"):
        shards.load_manifest(copy)


def test_mismatched_seq_len_and_tokenizer(manifest):
    with pytest.raises(shards.DataError, match="seq_len 32 but the model has model.seq_len=64"):
        manifest.check(seq_len=64)
    with pytest.raises(shards.DataError, match="tokenized with tokenizer"):
        manifest.check(tokenizer_hash="0" * 64)


def test_empty_corpus_leaves_nothing(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    with pytest.raises(shards.DataError, match="empty corpus"):
        shards.prepare(str(tmp_path / "empty.jsonl"), out, tokenizer, SEQ_LEN, "tiny")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(shards.DataError, match="no train sequence"):
        shards.prepare(str(tmp_path / "short.jsonl"), out, tokenizer, SEQ_LEN, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "short.jsonl"]
