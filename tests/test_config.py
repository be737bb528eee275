import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from forgetless import config
from forgetless.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    QuickstartConfig,
    ReplayConfig,
)
from forgetless.recipes import study

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_overrides():
    cfg = config.load(PretrainConfig, None, ["model.hidden=64", "opt.lr=2e-3", "stop.steps=5"])
    assert cfg.model.hidden == 64 and cfg.model.num_heads == 2 and cfg.opt.lr == 2e-3
    assert cfg.stop.steps == 5 and cfg.stop.tokens is None


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hidden: 96\n  head_dim: 32\nopt:\n  lr: 0.01\n")
    cfg = config.load(PretrainConfig, str(recipe), ["opt.lr=0.02"])
    assert cfg.model.hidden == 96 and cfg.model.num_heads == 3 and cfg.opt.lr == 0.02


def test_shipped_recipes_load():
    for name in ("pretrain-cpu", "pretrain-gpu"):
        assert config.load(PretrainConfig, name, []).model.vocab > 0


@pytest.mark.parametrize("override, message", [
    (["model.hiden=3"], "model.hiden: Key 'hiden' not in"),
    (["bogus=1"], "bogus: Key 'bogus' not in"),
    (["model.hidden=abc"], "model.hidden: Value 'abc'"),
    (["opt.lr=-1"], "opt.lr: must be positive"),
    (["opt.schedule=linear"], "opt.schedule: 'linear' is not one of"),
    (["model.mlp=relu"], "model.mlp:"),
    (["model.head_dim=48"], "model.head_dim: must divide model.hidden"),
    (["stop.tokens=0"], "stop.tokens: must be positive"),
    (["data_opts.valid_fraction=1.5"], "data_opts.valid_fraction"),
    (["lr"], "overrides are key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(PretrainConfig, None, override)


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="no recipe named 'nope'"):
        config.load(PretrainConfig, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(PretrainConfig, str(bad))
    bad.write_text("model:\n  layerz: 3\n")
    with pytest.raises(ConfigError, match="model.layerz"):
        config.load(PretrainConfig, str(bad))


def test_default_budget_only_when_no_stop_condition_is_set():
    def stop(schema, *overrides, recipe=None):
        return config.load(schema, recipe, list(overrides))

    assert stop(PretrainConfig).stop.tokens == 1_000_000
    assert stop(PretrainConfig, "stop.tokens=null").stop.tokens == 1_000_000
    long = stop(PretrainConfig, "stop.steps=5000").stop
    assert long.steps == 5000 and long.tokens is None
    assert stop(PretrainConfig, "stop.epochs=3").stop.tokens is None
    assert stop(FinetuneConfig).stop.tokens == 500_000
    assert stop(FinetuneConfig, "stop.patience=2").stop.tokens is None
    # a recipe that sets stop.tokens keeps it
    cpu = stop(PretrainConfig, "stop.steps=2", recipe="pretrain-cpu").stop
    assert (cpu.tokens, cpu.steps) == (1_000_000, 2)
    quick = stop(QuickstartConfig)
    assert (quick.pretrain.stop.tokens, quick.finetune.stop.tokens) == (1_000_000, 320_000)
    quick = stop(QuickstartConfig, "pretrain.stop.steps=9000", "finetune.stop.steps=900")
    assert quick.pretrain.stop.tokens is None and quick.finetune.stop.tokens is None
    assert quick.finetune.for_run("kl_pre:real", "").stop.steps == 900
    # what load records is what it loads back
    again = config.load_dict(QuickstartConfig, config.to_dict(stop(QuickstartConfig)))
    assert again.finetune.stop.tokens == 320_000


def test_study_presets_still_load():
    for presets in study.STUDIES.values():
        for preset, spec in presets.items():
            for pre in spec.pretrains.values():
                cfg = config.load(QuickstartConfig, None, [*spec.base, *pre])
                assert cfg.pretrain.stop.tokens or cfg.pretrain.stop.tokens_per_param, preset
                for _, run, fine in spec.finetunes:
                    values = config.to_dict(cfg.finetune.for_run(run, "replay"))
                    config.load_dict(FinetuneConfig, values, fine)
    capacity = study.STUDIES["capacity"]["cpu"]
    cfg = config.load(QuickstartConfig, None, capacity.base)
    assert cfg.pretrain.stop.tokens is None and cfg.pretrain.stop.tokens_per_param == 2


@pytest.mark.parametrize("override, message", [
    (["stop.tokens_per_param=2"], "stop.tokens_per_param: finetuning counts no parameters"),
    (["replay.source=real"], "replay.source: method none takes no replay"),
    (["method=lora", "replay.source=self", "replay.data=r"], "replay.source: method lora"),
    (["method=kl_dwn", "replay.source=onthefly"], "replay.source: method kl_dwn takes no"),
    (["replay.batch_size=4"], "replay.batch_size: has no effect with method=none"),
    (["method=lora", "replay.allow_foreign=true"], "replay.allow_foreign: has no effect"),
    (["method=kl_pre", "replay.source=real", "replay.data=r"], "replay.data: has no effect"),
    (["method=kl_pre", "replay.source=real", "replay.sampling.top_k=5"],
     "replay.sampling.top_k: has no effect with method=kl_pre, replay.source=real"),
    (["method=kl_pre", "replay.source=real", "replay.buffer_batches=2"],
     "replay.buffer_batches: has no effect"),
    (["method=replace", "replay.source=real", "lam=0.25", "replay.batch_size=4"],
     "replay.batch_size: has no effect with method=replace"),
    (["method=replace", "replay.source=real", "lam=0.99"],
     r"lam: .* lam in \[0.03125, 0.96875\]; got 0.99 \(32 replay rows\)"),
    (["method=replace", "replay.source=real", "lam=0.01"], r"lam: .*got 0.01 \(0 replay rows"),
    (["method=replace", "replay.source=real", "lam=1", "opt.batch_size=1"],
     "opt.batch_size: method=replace needs at least 2 rows"),
    (["deepspeed.stage=2"], "deepspeed.stage: has no effect with engine=megatron"),
    (["engine=deepspeed", "parallel.pp=2"], "parallel.pp: 2 is megatron's"),
    (["engine=deepspeed", "parallel.tp=2"], "parallel.tp: 2 is megatron's"),
    (["engine=deepspeed", "parallel.distributed_optimizer=true"],
     "parallel.distributed_optimizer: True is megatron's"),
    (["engine=deepspeed", "deepspeed.stage=2", "deepspeed.offload_param=cpu"],
     "deepspeed.offload_param: .* only stage 3"),
    (["engine=deepspeed", "deepspeed.stage=4"], "deepspeed.stage: must be 1, 2 or 3"),
    (["engine=deepspeed", "method=kl_pre", "replay.source=onthefly"],
     "replay.source: onthefly .* ZeRO-3 partitions"),
    (["engine=zero"], "engine: 'zero' is not one of megatron, deepspeed"),
])
def test_finetune_settings_that_do_nothing_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(FinetuneConfig, None, override)


def test_finetune_settings_that_apply_are_accepted():
    cfg = config.load(FinetuneConfig, None, [
        "method=kl_pre", "replay.source=onthefly", "replay.buffer_batches=2",
        "replay.sampling.temperature=0.8", "replay.seed=3", "replay.batch_size=4"])
    assert cfg.replay.sampling.temperature == 0.8
    for lam in (1 / 32, 31 / 32):
        config.load(FinetuneConfig, None, ["method=replace", "replay.source=real", f"lam={lam}"])


@pytest.mark.parametrize("override, message", [
    (["runs=[none:self]"], "runs: 'none:self': method none takes no replay"),
    (["runs=[kl_dwn:real]"], "runs: 'kl_dwn:real': method kl_dwn takes no replay"),
    (["runs=[kl_pre]"], "runs: 'kl_pre': method kl_pre needs a replay source"),
    (["runs=[replace:real]"], "runs: 'replace:real': lam: for method=replace"),
    (["runs=[none,lora]", "finetune.replay.batch_size=4"],
     "finetune.replay.batch_size: has no effect in any of runs"),
    (["finetune.method=kl_pre"], "finetune.method: quickstart sets it"),
    (["finetune.replay.source=real"], "finetune.replay.source: quickstart sets it"),
    (["pretrain.run_dir=elsewhere"], "pretrain.run_dir: quickstart sets it"),
    (["finetune.stop.tokens_per_param=2"], "stop.tokens_per_param"),
])
def test_quickstart_settings_that_do_nothing_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(QuickstartConfig, None, override)


def test_quickstart_runs_get_only_the_replay_settings_they_use():
    cfg = config.load(QuickstartConfig, None, ["finetune.replay.batch_size=4", "finetune.lam=0.25",
                                               "runs=[none,kl_pre:self,replace:real]",
                                               "finetune.opt.batch_size=8"])
    none, kl_pre = cfg.finetune.for_run("none", "r"), cfg.finetune.for_run("kl_pre:self", "r")
    assert type(none) is FinetuneConfig and none.method == "none"
    assert none.replay == ReplayConfig() and none.eval.interval == 20
    assert (kl_pre.replay.source, kl_pre.replay.data, kl_pre.replay.batch_size) == ("self", "r", 4)
    assert cfg.finetune.for_run("replace:real", "r").replay.batch_size == 16


def test_recipes_are_found_in_the_installed_package(tmp_path):
    """The wheel's files, unpacked as pip installs them, away from the checkout's recipes/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "forgetless", "data", "kernels", "recipes",
                 "launch"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True)
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "dist").glob("forgetless-*.whl"))).extractall(site)
    probe = ("import forgetless, sys; from forgetless import config; "
             "assert forgetless.__file__.startswith(sys.argv[1]), forgetless.__file__; "
             "print(config.load(config.PretrainConfig, 'pretrain-gpu').model.hidden)")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["768"]
