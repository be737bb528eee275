import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgetless import cli, config


@pytest.mark.parametrize("program", sorted(cli.PROGRAMS))
def test_every_key_of_every_program_has_help(program):
    rows = config.describe(cli.PROGRAMS[program][1])
    assert rows and all(text.strip() for _, _, text in rows), [k for k, _, t in rows if not t]
    assert len({key for key, _, _ in rows}) == len(rows)


def test_program_help_lists_keys_with_defaults(capsys):
    assert cli.main(["pretrain", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: forgetless pretrain [recipe]") and "pretrain-cpu" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for key, _, _ in config.describe(config.PretrainConfig):
        assert key in lines, key
    assert lines["model.hidden"].split()[1] == "128" and "residual" in lines["model.hidden"]
    assert "1000000 if no stop.* is set" in lines["stop.tokens"]
    # -h anywhere, after a recipe and settings too; data programs; quickstart's fixed keys
    assert cli.main(["finetune", "method=kl_pre", "-h"]) == 0
    assert "500000 if no stop.* is set" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "--help"]) == 0
    assert "data_opts.text_field" in capsys.readouterr().out
    assert cli.main(["data", "--help"]) == 0
    assert "data tokenizer" in capsys.readouterr().out
    assert cli.main(["quickstart", "--help"]) == 0
    assert "(set per stage)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in [*cli.PROGRAMS, *cli.TOOLS])


def test_print_config_resolves_without_running(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["pretrain", "pretrain-gpu", "opt.lr=0.01", f"run_dir={run_dir}",
                     "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["opt"]["lr"] == 0.01 and printed["model"]["hidden"] == 768
    assert printed["stop"]["tokens"] == 2_000_000_000 and printed["run_dir"] == str(run_dir)
    assert not run_dir.exists()
    assert cli.main(["pretrain", "--print-config", "stop.steps=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stop"]["tokens"] is None
    # a bad setting is still an error naming it
    assert cli.main(["pretrain", "--print-config", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_settings_that_do_nothing_are_one_line_errors(capsys):
    assert cli.main(["finetune", "checkpoint=x", "replay.batch_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetless finetune: error: replay.batch_size: has no effect")
    assert "\n" not in err
    assert cli.main(["quickstart", "runs=[none:self]"]) == 2
    assert "runs: 'none:self'" in capsys.readouterr().err


def test_result_json_only_on_the_main_rank(corpus, tmp_path, monkeypatch, capsys):
    args = ["data", "tokenizer", f"sources=[{corpus}]", "vocab=512"]
    monkeypatch.setenv("RANK", "1")
    assert cli.main([*args, f"out={tmp_path / 'a'}"]) == 0
    assert "{" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert cli.main([*args, f"out={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["vocab"] == 512


def test_python_m_forgetless_in_the_checkout_keeps_hugging_face_kernels(tmp_path):
    """`python -m forgetless` from the repository root: its kernels/ must not stand in for
    the `kernels` package transformers imports (an ImportError before any argument is read)."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = subprocess.run([sys.executable, "-m", "forgetless", "export",
                          f"checkpoint={tmp_path / 'none'}"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "out: is required" in out.stderr, out.stderr[-2000:]
