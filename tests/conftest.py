import itertools
import json

import pytest

from forgetless.data import shards
from forgetless.data import tokenizer as tok
from forgetless.data.sources import stdlib_prose

SEQ_LEN = 32
VOCAB = 512


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small JSONL corpus: the first 600 stdlib docstrings."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    docs = [text for _, text in itertools.islice(stdlib_prose(), 600)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory):
    return tok.train([str(corpus)], tmp_path_factory.mktemp("tok"), VOCAB, domains=["tiny"])


@pytest.fixture(scope="session")
def manifest(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tiny"
    return shards.prepare(str(corpus), out, tokenizer, SEQ_LEN, "tiny", valid_fraction=0.1,
                          shard_sequences=100)


@pytest.fixture(scope="session")
def megatron_world():
    from forgetless import parallel

    parallel.init(0)
    yield
