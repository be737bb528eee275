"""Self-generated replay and finetuning on a tiny two-domain world (prev -> down)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from forgetless import checkpoint, config, metrics, schedule
from forgetless.config import FinetuneConfig, GenerateConfig, PretrainConfig
from forgetless.data import shards
from forgetless.data.samples import read_split
from forgetless.recipes import finetune, generate, pretrain
from forgetless.sampler import generate as sample_sequences

from .conftest import MODEL


def _finetune_cfg(world, run_dir, *extra):
    """4 replay rows per step for the methods that take replay.batch_size."""
    takes_rows = {"method=ntp_pre", "method=kl_pre"} & set(extra)
    return config.load(FinetuneConfig, None, [
        f"run_dir={run_dir}", f"checkpoint={world['base']}", f"data={world['down'].path}",
        "opt.batch_size=8", *(["replay.batch_size=4"] if takes_rows else []), "eval.interval=2",
        "eval.max_sequences=16", "stop.tokens=null", "stop.steps=4", *extra])


def _replay_tokens(out):
    manifest = shards.load_manifest(out)
    return read_split(manifest, "train")


def test_sampler_same_tokens_whatever_the_batch(world, megatron_world):
    model, _ = checkpoint.load_model(checkpoint.latest(world["base"]))
    ids = torch.arange(100, 108)
    whole = sample_sequences(model, 5, ids, 32, seed=11)
    pieces = torch.cat([sample_sequences(model, 5, part, 32, seed=11) for part in
                        (ids[:3], ids[3:4], ids[4:])])
    assert torch.equal(whole, pieces)
    assert (whole[:, 0] == 5).all() and whole.shape == (8, 32)
    assert not torch.equal(whole, sample_sequences(model, 5, ids, 32, seed=12))
    assert len({tuple(r) for r in whole.tolist()}) == 8  # each id its own sample


def test_generate_provenance_and_resume(world, megatron_world, tmp_path):
    out = tmp_path / "replay"
    cfg = config.load(GenerateConfig, None, [f"checkpoint={world['base']}", f"out={out}",
                                             "samples=40", "first_id=10", "shard_samples=16",
                                             "batch_size=7", "seed=5"])
    result = generate.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    ckpt = checkpoint.latest(world["base"])
    prov = manifest["provenance"]
    assert prov["checkpoint"] == str(ckpt.resolve())
    assert prov["checkpoint_hash"] == checkpoint.content_hash(ckpt)
    assert prov["seed"] == 5 and prov["sample_ids"] == [10, 50]
    assert prov["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    assert manifest["train"]["sequences"] == 40 and manifest["train"]["tokens"] == 40 * 32
    assert manifest["tokenizer"]["hash"] == world["tokenizer"].hash
    assert manifest["domain_token"] == world["tokenizer"].domain_id("prev")
    assert result["generated_tokens"] == 40 * 32
    with tarfile.open(out / "replay-000001.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers()
                 if m.name.endswith(".meta.json")]
    assert [m["sample_id"] for m in metas] == list(range(26, 42))
    first = _replay_tokens(out)
    assert (first[:, 0] == manifest["domain_token"]).all()

    # interrupted: a shard is lost and a temporary file is left; the rerun fills in the gap
    (out / "replay-000001.tar").unlink()
    (out / ".replay-000002.tar.tmp").write_bytes(b"partial")
    again = generate.run(cfg)
    assert again["generated_tokens"] == 16 * 32
    assert np.array_equal(_replay_tokens(out), first)
    with pytest.raises(shards.DataError, match="seed differ"):
        generate.run(config.load(GenerateConfig, None, [f"checkpoint={world['base']}",
                                                        f"out={out}", "samples=40",
                                                        "first_id=10", "shard_samples=16",
                                                        "seed=6"]))


def test_generate_two_ranks_equals_one(world, tmp_path):
    """torchrun with 2 gloo processes, DP=2 (each takes its shards) and TP=2: tokens identical
    to 1 process."""
    args = [f"checkpoint={world['base']}", "samples=24", "shard_samples=6", "batch_size=4"]
    single = subprocess.run([sys.executable, "-m", "forgetless", "generate", *args,
                             f"out={tmp_path / 'one'}"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", "29517", "-m", "forgetless", "generate", *args,
                             f"out={tmp_path / 'two'}"], capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert np.array_equal(_replay_tokens(tmp_path / "one"), _replay_tokens(tmp_path / "two"))
    tensor = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "forgetless", "generate", *args,
                             "parallel.tp=2", f"out={tmp_path / 'tp2'}"], capture_output=True,
                            text=True, env=env)
    assert tensor.returncode == 0, tensor.stderr[-3000:]
    assert np.array_equal(_replay_tokens(tmp_path / "one"), _replay_tokens(tmp_path / "tp2"))


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_kl_pre_regulariser_has_zero_gradient_at_start(world, megatron_world):
    ckpt = checkpoint.latest(world["base"])
    student, _ = checkpoint.load_model(ckpt)
    teacher, _ = checkpoint.load_model(ckpt)
    down = torch.from_numpy(read_split(world["down"], "train")[:1])
    replay = torch.from_numpy(read_split(world["prev"], "train")[:1])
    batch = {"down": down.repeat(2, 1), "replay": replay.repeat(2, 1)}
    for method in ("kl_pre", "kl_dwn"):
        grads = []
        for lam in (0, 10):  # the same loss with and without the regulariser
            replay = ["replay.source=real"] if method == "kl_pre" else []
            cfg = _finetune_cfg(world, "unused", f"method={method}", *replay, f"lam={lam}")
            student.zero_grad()
            results = schedule.run(student, finetune.make_plan(cfg, teacher, 2)(batch),
                                   forward_only=False)
            grads.append(_grads(student))
            assert sum(float(r.get("reg_loss", 0)) for r in results) == 0.0
        assert grads[0] and all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), method

def test_methods_run_and_do_what_they_claim(world, megatron_world, tmp_path, monkeypatch):
    replay_dir = tmp_path / "replay"
    generate.run(config.load(GenerateConfig, None, [f"checkpoint={world['base']}",
                                                    f"out={replay_dir}", "samples=32"]))
    base_ckpt = checkpoint.latest(world["base"])
    base_weights = checkpoint.weights(base_ckpt)
    runs = {
        "none": [],
        "lora": ["method=lora", "lora.rank=4"],
        "replace": ["method=replace", "lam=0.25", "replay.source=real"],
        "ntp_pre": ["method=ntp_pre", "replay.source=self", f"replay.data={replay_dir}"],
        "kl_pre": ["method=kl_pre", "replay.source=self", f"replay.data={replay_dir}"],
        "kl_dwn": ["method=kl_dwn"],
        "onthefly": ["method=kl_pre", "replay.source=onthefly", "replay.buffer_batches=2"],
    }
    seen_rows = []
    real_forward = schedule.forward

    def recording_forward(model, micro):
        if micro.labels:  # training rows (evaluation asks for logits)
            seen_rows.append(micro.tokens[:, 0].tolist())
        return real_forward(model, micro)

    for name, extra in runs.items():
        if name == "replace":
            monkeypatch.setattr(schedule, "forward", recording_forward)
        final = finetune.run(_finetune_cfg(world, tmp_path / name, *extra))
        monkeypatch.setattr(schedule, "forward", real_forward)
        records = metrics.read(tmp_path / name / "metrics.jsonl")
        keys = {f"{p}_{m}{s}" for p in ("valid", "prev") for m in ("ntp", "kl")
                for s in ("", "_2nd")}
        assert [r["step"] for r in records] == [0, 2, 4] and all(keys <= r.keys()
                                                                 for r in records)
        assert records[0]["prev_kl"] == 0.0 and records[0]["valid_kl"] == 0.0, name
        assert final["valid_ntp"] < records[0]["valid_ntp"], name
        state = checkpoint.read_state(checkpoint.latest(tmp_path / name))
        assert state["method"] == (extra[0].split("=")[1] if extra else "none")
    # LoRA: base weights bit-identical, adapters trained; the merged model is a plain model
    trained = checkpoint.weights(checkpoint.latest(tmp_path / "lora"))
    assert all(torch.equal(trained[key], value) for key, value in base_weights.items())
    assert any(k.endswith("lora_b") and v.abs().sum() > 0 for k, v in trained.items())
    merged, _ = checkpoint.load_model(checkpoint.latest(tmp_path / "lora"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # replace: every training batch has 8 rows, 2 of them replay (prev's domain token first)
    prev_token, down_token = world["prev"].domain_token, world["down"].domain_token
    assert len(seen_rows) == 4
    assert all(len(r) == 8 and r.count(prev_token) == 2 and r.count(down_token) == 6
               for r in seen_rows)
    down = torch.full((6, 32), 7)
    replay = torch.full((2, 32), world["prev"].domain_token)
    rows = finetune.replace_rows(down, replay)
    assert rows.shape == (8, 32) and (rows[:, 0] == world["prev"].domain_token).sum() == 2
    assert finetune.replay_rows(_finetune_cfg(world, "x", "method=replace", "lam=0.25",
                                              "replay.source=real")) == 2


def test_finetune_resume_and_bad_inputs(world, megatron_world, tmp_path):
    cfg = _finetune_cfg(world, tmp_path / "a", "method=kl_pre", "replay.source=real",
                        "ckpt.interval=2")
    final = finetune.run(cfg)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(checkpoint.latest(tmp_path / "b"))
    resumed = finetune.run(_finetune_cfg(world, tmp_path / "b", "method=kl_pre",
                                         "replay.source=real", "ckpt.interval=2"))
    assert resumed["train_loss"] == pytest.approx(final["train_loss"], abs=1e-6)
    assert resumed["prev_ntp"] == pytest.approx(final["prev_ntp"], abs=1e-6)
    with pytest.raises(checkpoint.CheckpointError, match="another checkpoint or method"):
        finetune.run(_finetune_cfg(world, tmp_path / "a", "method=none"))

    # replay made with another tokenizer or seq_len is refused, naming the value
    bad = tmp_path / "bad"
    shutil.copytree(world["prev"].path.parent, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["seq_len"] = 64
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(shards.DataError, match="seq_len 64 does not match .* 32"):
        finetune.run(_finetune_cfg(world, tmp_path / "c", "method=ntp_pre",
                                   "replay.source=self", f"replay.data={bad}"))
    data["seq_len"], data["tokenizer"]["hash"] = 32, "f" * 64
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(shards.DataError, match="tokenizer hash ffffffffffff"):
        finetune.run(_finetune_cfg(world, tmp_path / "c", "method=ntp_pre",
                                   "replay.source=self", f"replay.data={bad}"))


@pytest.mark.parametrize("override, message", [
    (["method=ewc"], "method: 'ewc' is not one of"),
    (["lam=-1"], "lam: must be >= 0, got -1.0"),
    (["method=replace", "lam=1.5", "replay.source=real"], r"fraction, in \[0, 1\]; got 1.5"),
    (["method=kl_pre"], "replay.source: method kl_pre needs replay"),
    (["replay.source=self"], "replay.data"),
])
def test_finetune_config_errors(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(FinetuneConfig, None, ["checkpoint=x", *override])


def test_replay_shards_read_like_data_shards(world, megatron_world, tmp_path):
    out = tmp_path / "r"
    generate.run(config.load(GenerateConfig, None, [f"checkpoint={world['base']}", f"out={out}",
                                                    "samples=8"]))
    path = out / "replay-000000.tar"
    with tarfile.open(path) as tar:
        names = sorted(m.name for m in tar.getmembers())
        first = np.load(io.BytesIO(tar.extractfile(names[1]).read()))
    assert names[:2] == ["0000000000.meta.json", "0000000000.tokens.npy"]
    assert first.dtype == np.uint16 and first.shape == (32,)


def test_quickstart_pipeline_and_reuse(world, megatron_world, tmp_path, capsys):
    from forgetless.config import QuickstartConfig
    from forgetless.recipes import quickstart

    out = tmp_path / "qs"
    cfg = config.load(QuickstartConfig, None, [
        f"out={out}", f"pretrain.data={world['prev'].path}", *[f"pretrain.{m}" for m in MODEL],
        "pretrain.opt.batch_size=8", "pretrain.stop.tokens=null", "pretrain.stop.steps=30",
        "pretrain.eval.interval=30", "pretrain.eval.max_sequences=16", "generate.samples=24",
        f"finetune.data={world['down'].path}", "finetune.opt.batch_size=8",
        "finetune.replay.batch_size=4", "finetune.stop.tokens=null", "finetune.stop.steps=6",
        "finetune.eval.interval=3", "finetune.eval.max_sequences=16"])
    summary = quickstart.run(cfg)
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["replay"]) for r in results] == [
        ("none", "none"), ("lora", "none"), ("ntp_pre", "self"), ("kl_pre", "self"),
        ("kl_pre", "real")]
    for r in results:
        assert set(r) == {"method", "replay", "valid_ntp", "prev_ntp", "prev_ntp_before",
                          "forgetting", "wall_s"}
        assert r["forgetting"] == pytest.approx(r["prev_ntp"] - r["prev_ntp_before"])
    assert len({r["prev_ntp_before"] for r in results}) == 1  # one teacher for all
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "method" in printed and "forgetting" in printed and "kl_pre" in printed
    assert summary["plot"] == str(out / "forgetting.png")

    # a second invocation reuses every finished stage
    mtimes = {p: p.stat().st_mtime for p in out.rglob("state.json")}
    quickstart.run(cfg)
    assert {p: p.stat().st_mtime for p in out.rglob("state.json")} == mtimes
    assert json.loads((out / "results.json").read_text()) == results


def test_triton_backend_gives_the_torch_tokens_and_losses(world, megatron_world, tmp_path):
    """kernels.backend=triton (Triton's interpreter on CPU) against the PyTorch paths: top-k
    samples from logits, the full vocabulary straight from hidden states."""
    tokens = {}
    for backend in ("torch", "triton"):
        for name, sampling in (("top_k", ["sampling.top_k=40"]), ("full", [])):
            out = tmp_path / f"replay-{name}-{backend}"
            generate.run(config.load(GenerateConfig, None, [
                f"checkpoint={world['base']}", f"out={out}", "samples=6", "batch_size=3",
                *sampling, f"kernels.backend={backend}"]))
            tokens[name, backend] = _replay_tokens(out)
        finetune.run(_finetune_cfg(world, tmp_path / f"ft-{backend}", "method=kl_dwn",
                                   "stop.steps=3", "eval.interval=3", "eval.log_interval=1",
                                   f"kernels.backend={backend}"))
    for name in ("top_k", "full"):
        assert np.array_equal(tokens[name, "torch"], tokens[name, "triton"]), name
    torch_log, triton_log = (metrics.read(tmp_path / f"ft-{b}" / "metrics.jsonl")
                             for b in ("torch", "triton"))
    for a, b in zip(torch_log[1:], triton_log[1:], strict=True):
        for key in ("train_loss", "down_loss", "reg_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


def test_bf16_training_through_megatrons_mixed_precision(world, megatron_world, tmp_path):
    base = tmp_path / "base"
    pretrain.run(config.load(PretrainConfig, None, [
        f"run_dir={base}", f"data={world['prev'].path}", *MODEL, "opt.batch_size=8",
        "opt.warmup_steps=2", "stop.tokens=null", "stop.steps=12", "eval.interval=12",
        "eval.log_interval=1", "eval.max_sequences=16", "opt.precision=bf16"]))
    losses = [r["train_loss"] for r in metrics.read(base / "metrics.jsonl") if "train_loss" in r]
    assert losses[-1] < losses[0]
    weights = checkpoint.weights(checkpoint.latest(base))  # loads into a float32 model
    assert all(torch.isfinite(w).all() for w in weights.values())
    cfg = config.load(FinetuneConfig, None, [
        f"run_dir={tmp_path / 'ft'}", f"checkpoint={base}", f"data={world['down'].path}",
        "method=kl_pre", "replay.source=real", "opt.batch_size=8", "replay.batch_size=4",
        "stop.tokens=null", "stop.steps=2", "eval.interval=2", "eval.max_sequences=16",
        "opt.precision=bf16"])
    finetune.run(cfg)
    records = metrics.read(tmp_path / "ft" / "metrics.jsonl")
    assert records[0]["prev_kl"] == 0.0 and records[-1]["step"] == 2


def test_self_replay_must_come_from_the_base(world, megatron_world, tmp_path, tokenizer):
    own = tmp_path / "own"
    generate.run(config.load(GenerateConfig, None, [f"checkpoint={world['base']}", f"out={own}",
                                                    "samples=16"]))
    foreign = tmp_path / "foreign"  # as if generated from another checkpoint
    shutil.copytree(own, foreign)
    data = json.loads((foreign / "manifest.json").read_text())
    data["provenance"].update(checkpoint="/elsewhere/step_00000009", checkpoint_hash="ab" * 32)
    (foreign / "manifest.json").write_text(json.dumps(data))
    base_hash = checkpoint.content_hash(checkpoint.latest(world["base"]))
    self_replay = ["method=ntp_pre", "replay.source=self", "stop.steps=2"]
    with pytest.raises(shards.DataError, match=(
            rf"generated from checkpoint /elsewhere/step_00000009 \(abababababab\).*"
            rf"finetune's base .*base.* \({base_hash[:12]}\).*replay.allow_foreign=true")):
        finetune.run(_finetune_cfg(world, tmp_path / "a", *self_replay, f"replay.data={foreign}"))
    with pytest.raises(shards.DataError, match="is plain data .* replay.allow_foreign=true"):
        finetune.run(_finetune_cfg(world, tmp_path / "b", *self_replay,
                                   f"replay.data={world['prev'].path}"))
    # the user says so: it runs, and the run records it
    finetune.run(_finetune_cfg(world, tmp_path / "c", *self_replay, f"replay.data={foreign}",
                               "replay.allow_foreign=true"))
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "c"))
    first = metrics.read(tmp_path / "c" / "metrics.jsonl")[0]
    for record in (state, first):
        assert record["replay_foreign"] is True and record["replay_checkpoint_hash"] == "ab" * 32
    assert state["config"]["replay"]["allow_foreign"] is True
    finetune.run(_finetune_cfg(world, tmp_path / "d", *self_replay, f"replay.data={own}"))
    first = metrics.read(tmp_path / "d" / "metrics.jsonl")[0]
    assert first["replay_foreign"] is False and first["replay_checkpoint_hash"] == base_hash
    # a finetune tokenizes with its base's tokenizer: another data_opts.tokenizer is an error
    with pytest.raises(config.ConfigError, match=r"data_opts.tokenizer: .* is not the tokenizer "
                                                 r"of the base checkpoint"):
        finetune.run(_finetune_cfg(world, tmp_path / "e",
                                   f"data_opts.tokenizer={tokenizer.path.parent}"))
    assert not (tmp_path / "e").exists()
    base = checkpoint.read_state(checkpoint.latest(world["base"]))
    same = _finetune_cfg(world, tmp_path / "f", f"data_opts.tokenizer={world['tokenizer'].path}")
    assert finetune._tokenizer_opts(same, base).tokenizer == base["tokenizer"]["path"]
