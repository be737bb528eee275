import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Triton kernels run in Triton's interpreter where there is no GPU (set before any import of
# them: @triton.jit reads it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from forgetless import config
from forgetless.config import PretrainConfig
from forgetless.data import shards
from forgetless.data import tokenizer as tok
from forgetless.data.sources import stdlib_code, stdlib_prose
from forgetless.recipes import pretrain

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


@pytest.fixture
def megatron_world():
    """A world of one (again, where an in-process CLI run ended the previous one)."""
    from forgetless import parallel

    parallel.init(0)


MODEL = ["model.hidden=32", "model.layers=2", "model.head_dim=16", "model.seq_len=32",
         "model.vocab=512"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tokenizer, prev/down shards and a pretrained base, shared by the tests below."""
    root = tmp_path_factory.mktemp("world")
    for name, docs in (("prev", stdlib_prose()), ("down", stdlib_code())):
        texts = [t[:3000] for _, t in itertools.islice(docs, 400)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                    for t in texts))
    tokenizer = tok.train([str(root / "prev.jsonl"), str(root / "down.jsonl")], root / "tok",
                          512, domains=["prev", "down"])
    manifests = {name: shards.prepare(str(root / f"{name}.jsonl"), root / name, tokenizer, 32,
                                      name, valid_fraction=0.1)
                 for name in ("prev", "down")}
    base = config.load(PretrainConfig, None, [
        f"run_dir={root / 'base'}", f"data={manifests['prev'].path}", *MODEL,
        "opt.batch_size=8", "opt.warmup_steps=2", "stop.steps=40", "eval.interval=40",
        "eval.max_sequences=32"])
    pretrain.run(base)
    return {"root": root, "tokenizer": tokenizer, **manifests, "base": root / "base"}


LAYOUT_FAMILIES = ("llama_gqa_tied_rope_scaling", "qwen2_bias", "qwen3_qk_norm")


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    """tests/layout_check.py under torchrun with TP=2 and with PP=2, once per session:
    {layout: (its stdout, the directory of each rank's initial weights)}."""
    from .test_hf import FAMILIES, hf_model

    root = tmp_path_factory.mktemp("layouts")
    paths = []
    for family in LAYOUT_FAMILIES:
        config_class, overrides = FAMILIES[family]
        hf_model(root / family, config_class, **overrides)
        paths.append(str(root / family))
    program = Path(__file__).with_name("layout_check.py")
    runs = {}
    for layout in ("tp", "pp"):
        out = root / f"init-{layout}"
        out.mkdir()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", str(program), layout, str(out), *paths],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        runs[layout] = (done.stdout, out)
    return runs
