import pytest

from forgetless import config
from forgetless.config import ConfigError, PretrainConfig


def test_defaults_and_overrides():
    cfg = config.load(PretrainConfig, None, ["model.hidden=64", "opt.lr=2e-3", "stop.steps=5"])
    assert cfg.model.hidden == 64 and cfg.model.num_heads == 2 and cfg.opt.lr == 2e-3
    assert cfg.stop.steps == 5 and cfg.stop.tokens == 1_000_000


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
    (["stop.tokens=null"], "stop: set at least one"),
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
