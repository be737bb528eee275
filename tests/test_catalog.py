"""The data catalog: content-keyed cache entries, prepared once; options a manifest ignores."""

import json
import os
import subprocess
import sys

import pytest

from forgetless import config, metrics
from forgetless.config import ConfigError, DataConfig, FinetuneConfig
from forgetless.data import catalog, shards
from forgetless.data import tokenizer as tok
from forgetless.data.samples import read_split
from forgetless.recipes import finetune

from .conftest import SEQ_LEN, VOCAB


def _lines(corpus, start, stop):
    return "".join(corpus.read_text().splitlines(keepends=True)[start:stop])


def _resolve(data, cache, tokenizer, **opts):
    opts = DataConfig(tokenizer=str(tokenizer.path), **opts)
    return catalog.resolve(str(data), cache, SEQ_LEN, VOCAB, opts)[1]


def _entries(cache):
    return sorted(p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock"))


def _first_sequence(manifest):
    return read_split(manifest, "train")[0].tolist()


def test_cache_keyed_on_content_and_settings(corpus, tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    for folder, (start, stop) in (("a", (0, 200)), ("b", (200, 400))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(_lines(corpus, start, stop))
    a = _resolve(tmp_path / "a" / "train.jsonl", cache, tokenizer)
    b = _resolve(tmp_path / "b" / "train.jsonl", cache, tokenizer)
    assert a.path != b.path and _first_sequence(a) != _first_sequence(b)  # one stem, two entries
    assert a.path.parent.name == f"train-L{SEQ_LEN}-{a.data['key'][:12]}"
    files = a.data["fingerprint"]["source"]["files"]
    assert list(files) == [str((tmp_path / "a" / "train.jsonl").resolve())]
    capsys.readouterr()
    assert _resolve(tmp_path / "a" / "train.jsonl", cache, tokenizer).path == a.path
    assert "preparing" not in capsys.readouterr().out  # reused

    # one name= for two sources: two entries
    opts = DataConfig(tokenizer=str(tokenizer.path))
    named = [catalog.resolve(str(tmp_path / f / "train.jsonl"), cache, SEQ_LEN, VOCAB, opts,
                             name="tiny")[1] for f in ("a", "b")]
    assert named[0].path != named[1].path
    assert _first_sequence(named[0]) != _first_sequence(named[1])

    # an edited file is prepared again; other settings give other entries
    (tmp_path / "a" / "train.jsonl").write_text(_lines(corpus, 400, 600))
    edited = _resolve(tmp_path / "a" / "train.jsonl", cache, tokenizer)
    assert edited.path != a.path and _first_sequence(edited) != _first_sequence(a)
    assert "preparing" in capsys.readouterr().out
    other = {_resolve(tmp_path / "b" / "train.jsonl", cache, tokenizer, **kw).path
             for kw in ({"valid_fraction": 0.2}, {"shard_sequences": 50})}
    assert len(other | {b.path}) == 3
    (tmp_path / "b" / "body.jsonl").write_text(
        "".join(json.dumps({"body": json.loads(line)["text"]}) + "\n"
                for line in _lines(corpus, 200, 400).splitlines()))
    by_field = _resolve(tmp_path / "b" / "body.jsonl", cache, tokenizer, text_field="body")
    assert by_field.data["fingerprint"]["text_field"] == "body"
    assert len(_entries(cache)) == 8  # a, b, two named, edited a, two settings, body


def test_preparation_options_for_a_manifest_are_errors(manifest, tokenizer, corpus,
                                                        tmp_path):
    data = str(manifest.path)
    for key, value in (("text_field", "body"), ("valid_fraction", 0.5),
                       ("shard_sequences", 7)):
        with pytest.raises(ConfigError, match=f"data_opts.{key}: data= is a prepared manifest"):
            catalog.resolve(data, tmp_path, SEQ_LEN, VOCAB, DataConfig(**{key: value}))
    # the manifest's own tokenizer (what finetune passes) is fine; another one is an error
    same = DataConfig(tokenizer=str(tokenizer.path))
    assert catalog.resolve(data, tmp_path, SEQ_LEN, VOCAB, same)[1].path == manifest.path
    twin = tmp_path / "twin"  # the same tokenizer elsewhere
    twin.mkdir()
    for name in ("tokenizer.model", "tokenizer.json"):
        (twin / name).write_bytes((tokenizer.path.parent / name).read_bytes())
    assert catalog.resolve(data, tmp_path, SEQ_LEN, VOCAB,
                           DataConfig(tokenizer=str(twin)))[1].path == manifest.path
    with pytest.raises(ConfigError, match="data_opts.tokenizer: tokenizer .*no such file"):
        catalog.resolve(data, tmp_path, SEQ_LEN, VOCAB, DataConfig(tokenizer=str(tmp_path / "x")))
    small = tmp_path / "small.jsonl"
    small.write_text(_lines(corpus, 0, 300))
    other = tok.train([str(small)], tmp_path / "other", 600)
    with pytest.raises(ConfigError, match="data_opts.tokenizer: data= is a prepared manifest"):
        catalog.resolve(data, tmp_path, SEQ_LEN, VOCAB, DataConfig(tokenizer=str(other.path)))


SCRIPT = """
import json, os, pathlib, sys, time
import torch.distributed as dist
from forgetless.config import DataConfig
from forgetless.data import catalog
source, cache, start, out = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
catalog.BUILTIN = (source,)  # a tiny 'built-in' corpus, so training the tokenizer is quick
if "RANK" in os.environ:
    dist.init_process_group("gloo")
(start / str(os.getpid())).touch()  # all three processes go at once
deadline = time.time() + 120
while len(list(start.iterdir())) < 3 and time.time() < deadline:
    time.sleep(0.02)
tokenizer, manifest = catalog.resolve(source, cache, 32, 512, DataConfig())
# a file per process: ranks share one pipe, where their lines can interleave mid-line
pathlib.Path(out, str(os.getpid())).write_text(
    json.dumps([str(manifest.path), manifest.data["key"], tokenizer.hash]))
if dist.is_initialized():  # gloo can abort at exit otherwise
    dist.barrier()
    dist.destroy_process_group()
"""


def test_cold_cache_prepared_once_by_ranks_and_processes(corpus, tmp_path):
    """Two torchrun ranks and an unrelated process start at once on one cold cache."""
    script, cache, start = tmp_path / "resolve.py", tmp_path / "cache", tmp_path / "start"
    out = tmp_path / "out"
    script.write_text(SCRIPT)
    start.mkdir()
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(script), str(corpus), str(cache), str(start), str(out)]
    runs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    if [run.returncode for run in runs] != [0, 0]:
        pytest.fail("exit codes {}:\n{}".format([run.returncode for run in runs],
                                                  "\n----\n".join(outputs)))
    text = "".join(outputs)
    assert text.count("training the built-in tokenizer") == 1, text
    assert text.count("preparing") == 1, text
    results = [path.read_text() for path in out.iterdir()]
    assert len(results) == 3 and len(set(results)) == 1, results
    assert len(_entries(cache)) == 1
    assert (cache / "tokenizers" / "builtin-v2-512" / "tokenizer.json").exists()  # not v1's
    assert not [p for p in cache.rglob(".*") if p.name != ".lock"]  # no temporaries left


def test_finetune_on_own_data_with_a_tokenizer_of_other_domains(world, megatron_world,
                                                                tmp_path):
    """A first finetune on a user's JSONL: its sequences start with the generic token."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text((world["root"] / "down.jsonl").read_text())
    cfg = config.load(FinetuneConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"checkpoint={world['base']}", f"data={mine}",
        f"cache_dir={tmp_path / 'cache'}", "opt.batch_size=8", "eval.interval=2",
        "eval.max_sequences=8", "stop.tokens=null", "stop.steps=2"])
    finetune.run(cfg)
    assert [r["step"] for r in metrics.read(tmp_path / "run" / "metrics.jsonl")
            if "train_loss" in r][-1] == 2
    (entry,) = (tmp_path / "cache" / "data").glob("mine-*/manifest.json")
    manifest = shards.load_manifest(entry)
    assert manifest.data["domain_piece"] == "<|text|>"
    assert manifest.domain_token == world["tokenizer"].generic
    assert _first_sequence(manifest)[0] == world["tokenizer"].generic
