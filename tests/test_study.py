"""Quickstart and studies: stored stages are reused only with the settings they were run with,
and runs that missed a target downstream loss are told apart."""

import json
import re
import shutil

import pytest

from forgetless import config
from forgetless.config import QuickstartConfig
from forgetless.recipes import quickstart, study
from forgetless.recipes.quickstart import StageChanged

from .conftest import MODEL


def _tiny(world):
    return [f"pretrain.data={world['prev'].path}", *[f"pretrain.{m}" for m in MODEL],
            "pretrain.opt.batch_size=8", "pretrain.stop.tokens=null", "pretrain.stop.steps=6",
            "pretrain.eval.interval=6", "pretrain.eval.max_sequences=16", "generate.samples=16",
            f"finetune.data={world['down'].path}", "finetune.opt.batch_size=8",
            "finetune.stop.tokens=null", "finetune.stop.steps=2", "finetune.eval.interval=2",
            "finetune.eval.max_sequences=16"]


def test_quickstart_reuses_a_stage_only_with_its_settings(world, tmp_path, capsys):
    out = tmp_path / "qs"
    args = [*_tiny(world), f"out={out}", "runs=[none]"]

    def run(*more):
        return quickstart.run(config.load(QuickstartConfig, None, [*args, *more]))

    run()
    stored = json.loads((out / "finetune-none" / "result.json").read_text())
    capsys.readouterr()
    run("finetune.threads=1", "finetune.ckpt.keep=3")  # settings that change nothing
    assert "== finetune" not in capsys.readouterr().out
    refusals = {
        "finetune.opt.lr=0.003": f"stage finetune-none in {out} was run with "
        f"finetune.opt.lr=0.001, now finetune.opt.lr=0.003; use another output directory or "
        f"remove {out / 'finetune-none'}",
        "pretrain.opt.lr=0.01": "stage pretrain in",
        "pretrain.stop.steps=8": "pretrain.stop.steps=6, now pretrain.stop.steps=8",
        "generate.samples=32": "stage replay in",
    }
    for override, message in refusals.items():
        with pytest.raises(StageChanged, match=re.escape(message)):
            run(override)
    assert json.loads((out / "finetune-none" / "result.json").read_text()) == stored
    # another pretrained model under the same finetune: its stored result is not reused
    shutil.rmtree(out / "pretrain")
    shutil.rmtree(out / "replay")
    with pytest.raises(StageChanged, match="finetuned from another pretrained checkpoint"):
        run("pretrain.seed=1")


def test_high_lr_study_tells_runs_that_missed_the_target(world, tmp_path, monkeypatch):
    out = tmp_path / "high-lr"
    drawn = []
    monkeypatch.setattr(study, "save_figure", lambda fig, ax, path: drawn.append(ax))
    assert study.main(["high-lr", "--out", str(out), *_tiny(world),
                       "finetune.replay.batch_size=4", "finetune.stop.valid_loss=0.5"]) == 0
    rows = json.loads((out / "rows.json").read_text())
    assert len(rows) == 5 and all(r["reached"] is False and r["steps"] == 2 for r in rows)
    assert "| target | reached |" in (out / "table.md").read_text()
    lines = drawn[0].get_lines()[:-1]  # the last: the zero line
    assert len(lines) == 5
    missed = f"({study.MISSED})"
    assert all(line.get_markerfacecolor() == "none" and line.get_label().endswith(missed)
               for line in lines)
    # a mixed set: reached runs on their line, the missed one apart and hollow
    mixed = [{**rows[0], "reached": True, "steps": 1}, {**rows[1], "reached": False}]
    for row in mixed:
        row["finetune"] = "lr"
    study.figure(study.STUDIES["high-lr"]["cpu"], mixed, out / "mixed.png")
    hit, miss = drawn[1].get_lines()[:2]
    assert hit.get_label() == "lr" and list(hit.get_xdata()) == [1]
    assert miss.get_label() == f"lr ({study.MISSED})" and list(miss.get_xdata()) == [2]
    assert miss.get_markerfacecolor() == "none" and hit.get_color() == miss.get_color()
