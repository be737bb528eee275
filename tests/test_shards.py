import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from forgetless.data import shards
from forgetless.data import tokenizer as tok
from forgetless.data.samples import Samples, read_split
from forgetless.data.sources import documents, is_valid

from .conftest import SEQ_LEN


def _all(manifest, split):
    return list(read_split(manifest, split))


def test_round_trip(manifest, tokenizer, corpus):
    train, valid = _all(manifest, "train"), _all(manifest, "valid")
    assert Samples(manifest.shards("train")).read(np.arange(0)).shape[0] == 0
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
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(shards.DataError, match=f"shard {path}: truncated"):
        read_split(m, "train")
    path.write_bytes(b"this is not a tar file" * (len(whole) // 22 + 1))
    with pytest.raises(shards.DataError, match=f"shard {path}: corrupt sample"):
        read_split(m, "train")
    shards.index_path(path).unlink()  # without its index, the tar itself is walked
    with pytest.raises(shards.DataError, match=f"shard {path}: corrupt"):
        read_split(m, "train")
    path.write_bytes(whole)
    assert len(read_split(m, "train")) == m.sequences("train")
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


def _reference_pack(docs, seq_len, domain, eos):
    """The straightforward packing: documents joined by EOS, cut every seq_len - 1 tokens."""
    buffer, out = [], []
    for ids in docs:
        buffer += [*ids, eos]
        while len(buffer) >= seq_len - 1:
            out.append([domain, *buffer[: seq_len - 1]])
            buffer = buffer[seq_len - 1:]
    return out


def test_packing_matches_reference_and_is_linear(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 500, size=n).tolist() for n in (0, 1, 5, 31, 32, 100, 7, 64, 3)]
    writer = shards._SplitWriter(tmp_path, "train", 8, 5, shard_sequences=10**9, vocab=512)
    for ids in docs:
        writer.add(ids, 1)
    expected = _reference_pack(docs, 8, 5, 1)
    assert [s.tolist() for s in writer.pending] == expected
    writer.flush()
    assert writer.counts.sum() == 7 * len(expected)
    assert writer.counts[1] == sum(row[1:].count(1) for row in expected)
    long = (np.arange(2_000_000) % 60_000 + 2).tolist()  # one 2M-token document
    writer = shards._SplitWriter(tmp_path, "valid", 128, 5, shard_sequences=10**9,
                                 vocab=60_002)
    writer.add(long, 1)
    assert len(writer.pending) == 2_000_001 // 127
    assert np.array_equal(np.concatenate([s[1:] for s in writer.pending]),
                          np.asarray(long[: len(writer.pending) * 127]))


def test_big_text_file_lands_in_both_splits_and_any_spelling_splits_alike(
        tokenizer, tmp_path, monkeypatch):
    (tmp_path / "book.txt").write_text("".join(f"Chapter {i}.\n" + "Some words here. " * 40
                                               + "\n\n" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    rel = shards.prepare("book.txt", tmp_path / "rel", tokenizer, SEQ_LEN, "book", 0.1)
    ab = shards.prepare(str(tmp_path / "book.txt"), tmp_path / "abs", tokenizer, SEQ_LEN,
                        "book", 0.1)
    assert rel.sequences("train") > 0 and rel.sequences("valid") > 0
    for split in shards.SPLITS:
        assert np.array_equal(np.stack(_all(rel, split)), np.stack(_all(ab, split)))
    assert rel.data["key"] == ab.data["key"]
    generic = tokenizer.domain_id("book")  # no own token for 'book': the generic first token
    assert generic == tokenizer.generic and rel.data["domain_piece"] == "<|text|>"
    assert all(s[0] == generic for s in _all(rel, "train"))


def _broken(manifest, tmp_path, edit):
    data = json.loads(manifest.path.read_text())
    edit(data)
    copy = tmp_path / "copy"
    shutil.copytree(manifest.path.parent, copy, dirs_exist_ok=True)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_manifest_fields_checked_on_load(manifest, tmp_path):
    optional = _broken(manifest, tmp_path, lambda d: [d.pop(k) for k in (
        "unigram_entropy", "documents", "source", "key", "fingerprint", "domain_piece")])
    m = shards.load_manifest(optional)
    assert m.unigram_entropy is None and m.sequences("train") == manifest.sequences("train")
    assert manifest.unigram_entropy == manifest.data["unigram_entropy"]
    cases = [
        (lambda d: d.pop("seq_len"), "field seq_len is missing"),
        (lambda d: d["tokenizer"].pop("hash"), "field tokenizer.hash is missing"),
        (lambda d: d["train"].update(tokens="many"), "field train.tokens must be an integer"),
        (lambda d: d["valid"]["shards"][0].pop("path"), r"field valid.shards\[0\].path is miss"),
        (lambda d: d.update(unigram_entropy="low"), "field unigram_entropy must be a number"),
        (lambda d: d.update(domain_token=True), "field domain_token must be an integer"),
        (lambda d: d.update(train=[]), "field train must be an object"),
    ]
    for edit, message in cases:
        path = _broken(manifest, tmp_path, edit)
        with pytest.raises(shards.DataError, match=f"manifest {path}/manifest.json: {message}"):
            shards.load_manifest(path)


def test_only_shard_faults_are_called_corrupt(manifest, tmp_path, monkeypatch):
    path, n = manifest.shards("train")[0]
    odd = tmp_path / "odd.tar"
    shards.write_shard(odd, [np.zeros(4)], meta=lambda i: {"x": i})
    with tarfile.open(odd) as tar, tarfile.open(tmp_path / "no-tokens.tar", "w") as out:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                out.addfile(member, tar.extractfile(member))
    with pytest.raises(shards.DataError, match="holds 0 sequences, the manifest says 1"):
        Samples([(tmp_path / "no-tokens.tar", 1)]).read(np.arange(1))

    def failing_load(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(np, "load", failing_load)
    with pytest.raises(MemoryError, match="out of memory"):
        Samples([(path, n)]).read(np.arange(n))


def test_vocab_beyond_uint16_is_stored_as_uint32(tmp_path):
    """A tokenizer of 100K ids writes uint32 shards (the manifest says so) whose
    large ids come back whole through the loader."""
    from forgetless.data.loader import Loader, StreamSpec

    from .test_tokenizer import tiny_hf_tokenizer

    words = [f"w{i}" for i in range(100_000)]
    tokenizer = tok.load(tiny_hf_tokenizer(tmp_path / "tok", words))
    assert tokenizer.vocab_size > 2**16
    docs = [" ".join(words[-(i + 1) * 40:][:40]) for i in range(40)]
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = shards.prepare(str(source), tmp_path / "out", tokenizer, 16, "big",
                              valid_fraction=0.2)
    assert manifest.data["dtype"] == "uint32" and shards.token_dtype(100_000) == np.uint32
    assert manifest.data["first_token"] == tokenizer.bos_id == manifest.domain_token
    rows = torch.cat(list(Loader(StreamSpec(manifest, "train", 4, train=False))))
    assert rows.max() > 2**16 and (rows[:, 0] == tokenizer.bos_id).all()
    ids = {i for d in docs for i in tokenizer.encode(d)} | {tokenizer.eos_id, tokenizer.bos_id}
    assert set(rows.flatten().tolist()) <= ids
