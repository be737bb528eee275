import json
import shutil
import subprocess
import sys

import pytest
import torch

from forgetless import checkpoint, config, metrics
from forgetless.config import EvaluateConfig, PretrainConfig
from forgetless.data.shards import DataError
from forgetless.recipes import evaluate, pretrain

TINY = ["model.hidden=32", "model.layers=2", "model.head_dim=16", "model.seq_len=32",
        "model.vocab=512", "opt.batch_size=8", "opt.warmup_steps=2", "eval.interval=5",
        "eval.log_interval=5", "eval.max_sequences=40"]


def _cfg(manifest, run_dir, *extra):
    return config.load(PretrainConfig, None, [f"run_dir={run_dir}",
                                              f"data={manifest.path}", *TINY, *extra])


def test_pretrain_resume_and_evaluate(manifest, megatron_world, tmp_path):
    cfg = _cfg(manifest, tmp_path / "a", "stop.steps=20", "ckpt.interval=10")
    final = pretrain.run(cfg)
    records = metrics.read(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20]
    assert all({"step", "tokens", "train_loss", "tokens_per_s", "valid_ntp"} <= r.keys()
               for r in records[1:])
    assert records[0]["valid_ntp"] > records[-1]["valid_ntp"]  # step 0: the untrained model
    assert records[-1]["tokens"] == 20 * 8 * 32
    assert records[-1]["valid_ntp"] < records[0]["valid_ntp"]
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "a")] == [
        "step_00000010", "step_00000020"]
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "a"))
    assert state["finished"] and state["data"]["position"] > 0 and state["tokenizer"]["hash"]
    assert state["config"]["model"]["hidden"] == 32 and state["manifest"]

    # a second invocation loads the final checkpoint and evaluates the same loss
    again = pretrain.run(cfg)
    assert again["step"] == 20 and again["valid_ntp"] == pytest.approx(final["valid_ntp"],
                                                                       abs=1e-9)
    ev = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "a")))
    assert ev["valid_ntp"] == pytest.approx(final["valid_ntp"], abs=1e-9)

    # killed after step 10: resuming from that checkpoint reproduces the run exactly
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000020")
    resumed = pretrain.run(_cfg(manifest, tmp_path / "b", "stop.steps=20", "ckpt.interval=10"))
    assert resumed["train_loss"] == pytest.approx(final["train_loss"], abs=1e-6)
    assert resumed["valid_ntp"] == pytest.approx(final["valid_ntp"], abs=1e-6)
    assert [r["step"] for r in metrics.read(tmp_path / "b" / "metrics.jsonl")] == [
        0, 5, 10, 15, 20]


def test_stop_conditions(manifest, megatron_world, tmp_path):
    by_tokens = pretrain.run(_cfg(manifest, tmp_path / "t", "stop.tokens=2000"))
    assert by_tokens["step"] == 8  # ceil(2000 / (8 * 32))
    by_epochs = pretrain.run(_cfg(manifest, tmp_path / "e", "stop.tokens=null",
                                  "stop.epochs=0.1"))
    assert by_epochs["tokens"] >= 0.1 * manifest.data["train"]["tokens"]
    by_loss = pretrain.run(_cfg(manifest, tmp_path / "l", "stop.tokens=null",
                                "stop.valid_loss=100", "opt.schedule=constant"))
    assert by_loss["step"] == 5  # the first evaluation already meets the target
    with pytest.raises(config.ConfigError, match="opt.schedule: cosine needs"):
        pretrain.run(_cfg(manifest, tmp_path / "x", "stop.tokens=null", "stop.valid_loss=1"))


def test_bad_inputs(manifest, megatron_world, tmp_path):
    with pytest.raises(DataError, match="model.seq_len=64"):
        pretrain.run(_cfg(manifest, tmp_path / "s", "model.seq_len=64", "stop.steps=1"))
    with pytest.raises(DataError, match="vocab 512 but model.vocab=1024"):
        pretrain.run(_cfg(manifest, tmp_path / "v", "model.vocab=1024", "stop.steps=1"))
    pretrain.run(_cfg(manifest, tmp_path / "w", "stop.steps=1"))
    with pytest.raises(checkpoint.CheckpointError, match="model.hidden: 32 in the checkpoint"):
        pretrain.run(_cfg(manifest, tmp_path / "w", "stop.steps=2", "model.hidden=64",
                          "model.head_dim=32"))
    ckpt = checkpoint.latest(tmp_path / "w")
    shutil.rmtree(ckpt / "model")
    with pytest.raises(checkpoint.CheckpointError, match=r"no weights \(model/ is missing\)"):
        evaluate.run(EvaluateConfig(checkpoint=str(ckpt)))
    with pytest.raises(checkpoint.CheckpointError, match="no such directory"):
        evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "nothing")))


def test_cli_reports_errors_and_runs(manifest, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "forgetless", "pretrain", "model.hiden=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "error: model.hiden: Key 'hiden' not in" in bad.stderr
    out = subprocess.run([sys.executable, "-m", "forgetless", "pretrain",
                          f"run_dir={tmp_path / 'cli'}", f"data={manifest.path}", *TINY,
                          "stop.steps=3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["step"] == 3


def test_cli_data_programs(corpus, tokenizer, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True,
                              text=True)

    out = cli("data", "prepare", f"source={corpus}", "--out", str(tmp_path / "shards"),
              "--name=tiny", "seq_len=16", "vocab=512",
              f"data_opts.tokenizer={tokenizer.path.parent}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["seq_len"] == 16 and result["train_sequences"] > 0
    assert (tmp_path / "shards" / "manifest.json").exists()
    other = cli("data", "prepare", f"source={corpus}", f"out={tmp_path / 'x'}", "seq_len=16",
                "vocab=512", "name=other", f"data_opts.tokenizer={tokenizer.path.parent}")
    assert other.returncode == 0, other.stderr  # no own domain token: the generic first token
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["domain_token"] == \
        tokenizer.generic
    tok = cli("data", "tokenizer", f"sources=[{corpus}]", f"out={tmp_path / 'tok'}", "vocab=400",
              "domains=[a]")
    assert tok.returncode == 0, tok.stderr
    assert json.loads(tok.stdout)["domains"] == {"a": 2}
    assert cli("data", "nothing").returncode == 2


def test_manifest_without_unigram_entropy(manifest, megatron_world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(manifest.path.parent, data)
    fields = json.loads((data / "manifest.json").read_text())
    del fields["unigram_entropy"]  # optional: older manifests and replay lack it
    (data / "manifest.json").write_text(json.dumps(fields))
    final = pretrain.run(config.load(PretrainConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"data={data}", *TINY, "stop.steps=1"]))
    assert final["unigram_entropy"] is None and final["step"] == 1
    assert "unigram entropy n/a" in capsys.readouterr().out


def test_a_step_waits_on_the_device_as_often_with_more_microbatches(manifest, megatron_world,
                                                                    tmp_path, monkeypatch):
    """The step's losses stay on the device until its one reduction: the host waits for the
    device (item, tolist, float, bool of a tensor) as many times with 4 microbatches as with
    one, and the step's losses are the same."""
    from forgetless import train

    syncs: list[str] = []
    active = [False]
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if active[0]:
                syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    step, per_step = train.train_step, {}

    def counting(run, batch, stopping=bool):
        start, active[0] = len(syncs), True
        try:
            return step(run, batch, stopping)
        finally:
            active[0] = False
            per_step.setdefault(micro, []).append(len(syncs) - start)

    monkeypatch.setattr(train, "train_step", counting)
    losses = {}
    for micro in (1, 4):
        run_dir = tmp_path / str(micro)
        pretrain.run(_cfg(manifest, run_dir, "stop.steps=3", f"parallel.microbatches={micro}",
                          "eval.log_interval=1"))
        losses[micro] = [r["train_loss"] for r in metrics.read(run_dir / "metrics.jsonl")[1:]]
    assert per_step[1] == per_step[4] and len(per_step[1]) == 3, per_step
    assert losses[1] == pytest.approx(losses[4], abs=1e-5)  # float32 sums in another order
