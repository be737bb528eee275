"""`forgetless export` and a Hugging Face base through the whole pipeline: checkpoints of any
layout export to models transformers loads with the same logits and greedy tokens, and a
Hugging Face model is a base for generate, every finetuning method, evaluate and export."""

import json

import pytest
import torch
import transformers

from forgetless import checkpoint, cli, metrics, parallel
from forgetless.data import tokenizer as tok
from forgetless.data.loader import Loader, StreamSpec
from forgetless.data.shards import load_manifest
from forgetless.sampler import generate

from .conftest import MODEL
from .test_hf import hf_model
from .test_parallel import _torchrun

LAYOUTS = {  # (layout, architecture): together they cover TP, PP, qk-norm, GQA and tying
    "tp2_qk_norm": (["parallel.tp=2"], ["model.qk_norm=true"], "Qwen3ForCausalLM"),
    "tp2_no_qk_norm": (["parallel.tp=2"], ["model.qk_norm=false"], "LlamaForCausalLM"),
    "pp2_gqa_tied": (["parallel.pp=2", "parallel.microbatches=2"],
                     ["model.qk_norm=false", "model.query_groups=1",
                      "model.tie_embeddings=true"], "LlamaForCausalLM"),
}


def _valid_batch(manifest, n=4):
    return next(iter(Loader(StreamSpec(manifest, "valid", n, train=False))))


def _greedy_hf(model, first, n, length):
    """transformers' greedy continuation of `first`, run to full length (EOS does not stop)."""
    model.generation_config.eos_token_id = None
    start = torch.full((n, 1), first, dtype=torch.long)
    return model.generate(start, attention_mask=torch.ones_like(start), do_sample=False,
                          max_new_tokens=length - 1, pad_token_id=0)


def _check_parity(ckpt, out, manifest, first):
    """The exported model against the checkpoint it came from: logits and 32 greedy tokens."""
    parallel.init(0)  # the CLI run before ended its world
    ours, _ = checkpoint.load_model(checkpoint.resolve(ckpt))
    ours.eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _valid_batch(manifest)
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        expected = theirs(tokens).logits
        got = ours(tokens, positions, attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(generate(ours, first, torch.arange(2), 32, seed=0, temperature=0.0),
                       _greedy_hf(theirs, first, 2, 32))
    return theirs


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_from_any_layout(name, world, megatron_world, tmp_path):
    layout, arch, hf_class = LAYOUTS[name]
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    _torchrun(2, "pretrain", [f"run_dir={run_dir}", f"data={world['prev'].path}", *MODEL, *arch,
                              "opt.batch_size=8", "stop.steps=4", "threads=1",
                              "eval.interval=4", "eval.max_sequences=8", *layout])
    assert cli.main(["export", f"checkpoint={run_dir}", f"out={out}"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf_class]
    first = world["prev"].domain_token
    assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == first
    _check_parity(run_dir, out, world["prev"], first)
    # the tokenizer travels: AutoTokenizer gives the sentencepiece ids
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = load_manifest(world["prev"].path).name + " def f(x):\n\treturn  x ** 2  # héllo"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == world["tokenizer"].encode(text)
    card = (out / "README.md").read_text()
    assert "pretrained from scratch" in card and "valid_ntp" in card


def test_export_refuses_what_no_class_matches(world, megatron_world, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["pretrain", f"run_dir={run_dir}", f"data={world['prev'].path}", *MODEL,
                     "model.mlp=gelu", "opt.batch_size=4", "stop.steps=1"]) == 0
    assert cli.main(["export", f"checkpoint={run_dir}", f"out={tmp_path / 'hf'}"]) == 2
    assert not (tmp_path / "hf").exists()
    assert cli.main(["export", f"checkpoint={run_dir}", f"out={tmp_path / 'hf'}",
                     "max_shard_size=lots"]) == 2


@pytest.fixture(scope="module")
def hf_base(world, tmp_path_factory):
    """A Hugging Face Llama (GQA, tied embeddings) whose tokenizer is the world's, exported
    with export_hf, its BOS the previous data's domain token; and data tokenized with it."""
    root = tmp_path_factory.mktemp("hf_base")
    base = root / "base"
    prev_id = world["tokenizer"].domain_id("prev")
    tok.export_hf(world["tokenizer"], base, bos_token=world["tokenizer"].piece(prev_id))
    hf_model(base, vocab_size=512, max_position_embeddings=32, tie_word_embeddings=True,
             bos_token_id=prev_id, eos_token_id=world["tokenizer"].eos_id)
    manifests = {}
    for name in ("prev", "down"):
        out = root / f"{name}_hf"
        assert cli.main(["data", "prepare", f"source={world['root'] / f'{name}.jsonl'}",
                         f"out={out}", "seq_len=32", f"data_opts.tokenizer={base}"]) == 0
        manifests[name] = load_manifest(out)
    return {"base": base, "root": root, "bos": prev_id, **manifests}


def _finetune(hf_base, run_dir, *extra):
    return cli.main(["finetune", f"run_dir={run_dir}", f"checkpoint={hf_base['base']}",
                     f"data={hf_base['down'].path}", f"prev_data={hf_base['prev'].path}",
                     "opt.batch_size=8", "stop.steps=3", "eval.interval=3",
                     "eval.max_sequences=16", "threads=1", *extra])


def test_hf_base_through_the_pipeline(world, hf_base, megatron_world, tmp_path):
    base, prev = hf_base["base"], hf_base["prev"]
    assert prev.domain_token == hf_base["bos"]  # sequences start with the tokenizer's BOS
    # evaluate: the imported model's loss is transformers' on the same sequences
    reference = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    tokens = torch.cat(list(Loader(StreamSpec(prev, "valid", 16, train=False, limit=16))))
    with torch.no_grad():
        logits = reference(tokens[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).item()
    assert cli.main(["evaluate", f"checkpoint={base}", f"data={prev.path}",
                     "max_sequences=16"]) == 0
    # generate: self-replay from BOS
    replay = tmp_path / "replay"
    assert cli.main(["generate", f"checkpoint={base}", f"out={replay}", "samples=16",
                     "batch_size=8", "shard_samples=8"]) == 0
    samples = next(iter(Loader(StreamSpec(load_manifest(replay), "train", 16, train=False))))
    assert (samples[:, 0] == hf_base["bos"]).all()
    # finetune with every kind of base-dependent method, then export each
    runs = {"kl_pre": ["method=kl_pre", "replay.source=real", "replay.batch_size=4"],
            "ntp_pre_self": ["method=ntp_pre", "replay.source=self", f"replay.data={replay}",
                             "replay.batch_size=4"],
            "lora": ["method=lora"]}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        assert _finetune(hf_base, run_dir, *extra) == 0
        records = [r for r in metrics.read(run_dir / "metrics.jsonl") if "prev_ntp" in r]
        assert records[0]["step"] == 0 and records[0]["prev_ntp"] == pytest.approx(expected,
                                                                                  abs=1e-4)
        out = tmp_path / f"{name}_hf"
        assert cli.main(["export", f"checkpoint={run_dir}", f"out={out}"]) == 0
        _check_parity(run_dir, out, prev, hf_base["bos"])
        card = (out / "README.md").read_text()
        assert "forgetting" in card and str(base) in card
        exported = transformers.AutoTokenizer.from_pretrained(out)
        text = "def f(x):\n    return x  # héllo"
        assert exported.encode(text, add_special_tokens=False) == tok.load(base).encode(text)


def test_hf_base_needs_its_previous_data(hf_base, megatron_world, tmp_path):
    assert cli.main(["finetune", f"run_dir={tmp_path}", f"checkpoint={hf_base['base']}",
                     f"data={hf_base['down'].path}", "stop.steps=1"]) == 2
    assert cli.main(["evaluate", f"checkpoint={hf_base['base']}"]) == 2


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2",
                                                        "parallel.microbatches=2"]])
def test_hf_base_loads_per_rank_like_one_process(layout, hf_base, tmp_path):
    """Each rank reads its slices (TP) or its stage's layers (PP, tied embeddings on both
    ends): the same losses as one process, step 0 included."""
    def losses(run_dir):
        return [(r["step"], r.get("train_loss"), r.get("prev_ntp"))
                for r in metrics.read(run_dir / "metrics.jsonl")
                if "train_loss" in r or "prev_ntp" in r]

    args = [f"checkpoint={hf_base['base']}", f"data={hf_base['down'].path}",
            f"prev_data={hf_base['prev'].path}", "opt.batch_size=8", "stop.steps=2",
            "eval.interval=2", "eval.max_sequences=8", "eval.log_interval=1", "threads=1"]
    assert cli.main(["finetune", f"run_dir={tmp_path / 'one'}", *args]) == 0
    _torchrun(2, "finetune", [f"run_dir={tmp_path / 'two'}", *args, *layout])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) >= 3
    for a, b in zip(one, two, strict=True):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:], strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-5), (a, b)


def test_tokenizer_vocab_must_fit_the_model(world, hf_base, tmp_path):
    """A Hugging Face tokenizer may have fewer ids than the model's (padded) embedding, never
    more; a sentencepiece one must match exactly. Each error names the tokenizer."""
    from forgetless.config import DataConfig
    from forgetless.data import catalog
    from forgetless.errors import UserError

    source = str(world["root"] / "prev.jsonl")
    padded = catalog.resolve(source, tmp_path, 32, 640, DataConfig(tokenizer=str(hf_base["base"])))
    assert padded[0].vocab_size == 512
    with pytest.raises(UserError, match=f"tokenizer {hf_base['base']}.*model.vocab=300"):
        catalog.resolve(source, tmp_path, 32, 300, DataConfig(tokenizer=str(hf_base["base"])))
    with pytest.raises(UserError, match="has vocab 512 but model.vocab=640"):
        catalog.resolve(source, tmp_path, 32, 640,
                        DataConfig(tokenizer=str(world["tokenizer"].path.parent)))
