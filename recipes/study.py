"""`forgetless study <name>`: the paper's studies from your own runs.

Each study is a sweep over pretraining variants (each pretrained once, with its own
self-generated replay) and finetuning variants of the quickstart pipeline, then an
aggregation: `table.csv`, `table.md` and `figure.png` in the output directory. Finished stages
are reused (only with the settings they were run with, as in the quickstart), so an
interrupted study continues. Runs that stop at a target downstream loss
(`finetune.stop.valid_loss`) record whether they reached it; the figure draws those that did
not hollow, at their step budget. Presets: `cpu` (sized for a 2-core machine)
and `gpu` (sized like the paper; point `pretrain.data` / `finetune.data` at real corpora).

    forgetless study method-comparison [--preset cpu|gpu] [--out DIR] [key=value ...]

key=value settings are quickstart keys (`pretrain.*`, `generate.*`, `finetune.*`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from forgetless import checkpoint, config  # noqa: E402
from forgetless.atomic import atomic_write_text  # noqa: E402
from forgetless.config import QuickstartConfig  # noqa: E402
from forgetless.recipes.quickstart import (  # noqa: E402
    Finetune,
    check,
    finetune_config,
    finetune_stage,
    plot,
    pretrain_stage,
    save_figure,
    stages,
)


@dataclass
class Study:
    pretrains: dict[str, list[str]]  # name -> quickstart overrides of its pretraining
    finetunes: list[Finetune]
    base: list[str]  # quickstart overrides for every stage
    x: str = ""  # the figure's x axis: a column of the table ('' : the method comparison)
    series: tuple[str, ...] = ("method",)  # columns naming a line of the figure


GPU = ["pretrain.model.hidden=768", "pretrain.model.layers=12", "pretrain.model.head_dim=64",
       "pretrain.model.seq_len=1024", "pretrain.model.vocab=32000", "pretrain.opt.batch_size=256",
       "pretrain.stop.tokens=2000000000", "pretrain.eval.interval=1000",
       "generate.samples=200000", "generate.batch_size=256", "finetune.opt.batch_size=64",
       "finetune.replay.batch_size=32", "finetune.stop.tokens=100000000",
       "finetune.eval.interval=200"]
METHODS = [("none", "none"), ("kl_pre", "kl_pre:self")]


def _lr_sweep(lrs: list[float]) -> list[Finetune]:
    return [(f"{name}-lr={lr}", spec, [f"opt.lr={lr}"]) for lr in lrs for name, spec in METHODS]


def _high_lr(low: float, high: float, lams: list[float]) -> list[Finetune]:
    return [(f"none-lr={low}", "none", [f"opt.lr={low}"]),
            (f"none-lr={high}", "none", [f"opt.lr={high}"])] + [
        (f"kl_pre-lr={high}-lam={lam}", "kl_pre:self", [f"opt.lr={high}", f"lam={lam}"])
        for lam in lams]


def _sizes(hiddens: list[int]) -> dict[str, list[str]]:
    return {f"hidden={h}": [f"pretrain.model.hidden={h}"] for h in hiddens}


COMPARED = [(spec.replace(":", "-"), spec, []) for spec in
           ("none", "lora", "ntp_pre:self", "kl_pre:self", "kl_pre:real")]

STUDIES: dict[str, dict[str, Study]] = {
    "method-comparison": {
        "cpu": Study({"base": []}, COMPARED, []),
        "gpu": Study({"base": []}, COMPARED, GPU),
    },
    "learning-rate": {
        "cpu": Study({f"plr={lr}": [f"pretrain.opt.lr={lr}"] for lr in (5e-4, 2e-3)},
                     _lr_sweep([3e-4, 1e-3, 3e-3]),
                     ["finetune.stop.tokens=160000", "generate.samples=640",
                      "finetune.eval.interval=10"], x="lr", series=("pretrain", "method")),
        "gpu": Study({f"plr={lr}": [f"pretrain.opt.lr={lr}"] for lr in (3e-4, 1e-3, 3e-3)},
                     _lr_sweep([1e-5, 3e-5, 1e-4, 3e-4, 1e-3]), GPU, x="lr",
                     series=("pretrain", "method")),
    },
    "high-lr": {
        "cpu": Study({"base": []}, _high_lr(3e-4, 3e-3, [3.0, 10.0, 30.0]),
                     ["finetune.stop.valid_loss=4.8", "finetune.stop.tokens=480000",
                      "finetune.eval.interval=5", "generate.samples=1920"], x="steps",
                     series=("finetune",)),
        "gpu": Study({"base": []}, _high_lr(1e-4, 1e-3, [3.0, 10.0, 30.0]),
                     [*GPU, "finetune.stop.valid_loss=2.5"], x="steps", series=("finetune",)),
    },
    "capacity": {
        "cpu": Study(_sizes([64, 128, 192]), [(n, s, []) for n, s in METHODS],
                     ["pretrain.stop.tokens_per_param=2", "pretrain.stop.tokens=null",
                      "finetune.stop.tokens=160000", "generate.samples=640"], x="params"),
        "gpu": Study({f"hidden={h}": [f"pretrain.model.hidden={h}",
                                      f"pretrain.model.layers={layers}"]
                      for h, layers in ((512, 8), (768, 12), (1024, 16), (1536, 24))},
                     [(n, s, []) for n, s in METHODS],
                     [*GPU, "pretrain.stop.tokens_per_param=20", "pretrain.stop.tokens=null"],
                     x="params"),
    },
}
COLUMNS = ("pretrain", "finetune", "method", "replay", "lr", "params", "steps", "valid_ntp",
           "prev_ntp", "prev_ntp_before", "forgetting", "wall_s")
TARGET_COLUMNS = ("target", "reached")  # when runs stop at a target downstream loss
MISSED = "did not reach the target"


def run_study(study: Study, out: Path, overrides: list[str]) -> list[dict]:
    """Every stage of every pretraining variant is checked against what it was run with
    before anything runs; then the rows of the table, one per finetune."""
    variants = {pname: config.load(QuickstartConfig, None, [*study.base, *pre, *overrides])
                for pname, pre in study.pretrains.items()}
    for pname, cfg in variants.items():
        check(stages(cfg, out / pname, study.finetunes), out / pname)
    rows = []
    for pname, cfg in variants.items():
        where = out / pname
        where.mkdir(parents=True, exist_ok=True)
        base_hash = pretrain_stage(cfg, where)
        params = checkpoint.read_state(checkpoint.latest(where / "pretrain"))["params"]
        for run in study.finetunes:
            fine = finetune_config(cfg, run, where)
            result = finetune_stage(cfg, run, where, base_hash)
            target = fine.stop.valid_loss
            rows.append({"pretrain": pname, "finetune": run[0], "params": params,
                         "lr": fine.opt.lr, "target": target,
                         "reached": None if target is None else result["valid_ntp"] <= target,
                         **result})
    return rows


def _lines(study: Study, rows: list[dict]) -> dict[str, list[dict]]:
    lines: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r[study.x]):
        lines.setdefault(" ".join(str(row[c]) for c in study.series), []).append(row)
    return lines


def figure(study: Study, rows: list[dict], path: Path) -> None:
    """Forgetting against study.x, a line per series; a run that missed its target is a
    hollow marker at its step budget, not a point on its line."""
    if not study.x:
        plot(rows, path)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, points) in enumerate(_lines(study, rows).items()):
        reached = [r for r in points if r["reached"] is not False]
        missed = [r for r in points if r["reached"] is False]
        if reached:
            ax.plot([r[study.x] for r in reached], [r["forgetting"] for r in reached],
                    marker="o", color=f"C{i}", label=label)
        if missed:
            ax.plot([r[study.x] for r in missed], [r["forgetting"] for r in missed],
                    marker="o", linestyle="none", markerfacecolor="none", color=f"C{i}",
                    label=f"{label} ({MISSED})")
    if study.x in ("lr", "params"):
        ax.set_xscale("log")
    ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel({"lr": "finetuning learning rate", "params": "parameters",
                   "steps": "finetuning steps (to the target downstream loss)"}[study.x])
    ax.set_ylabel("forgetting (rise of prev_ntp, nats)")
    save_figure(fig, ax, path)


def _cell(value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def write_tables(rows: list[dict], out: Path) -> str:
    columns = COLUMNS + (TARGET_COLUMNS if any(r["target"] is not None for r in rows) else ())
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "table.csv", table.getvalue())
    markdown = "\n".join(["| " + " | ".join(columns) + " |",
                          "|" + " --- |" * len(columns)] +
                         ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows])
    atomic_write_text(out / "table.md", markdown + "\n")
    return markdown


def _args(argv: list[str]) -> argparse.Namespace:
    """The study's arguments, its overrides validated as quickstart keys."""
    parser = argparse.ArgumentParser(prog="forgetless study", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(STUDIES))
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    config.load(QuickstartConfig, None, args.overrides)
    return args


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/studies/{args.name}-{args.preset}")


def out_dir(argv: list[str]) -> Path:
    """Where `forgetless study <argv>` writes (what `launch slurm study` uses as its run dir)."""
    return _out(_args(argv))


def main(argv: list[str]) -> int:
    args = _args(argv)
    start = time.perf_counter()
    out = _out(args)
    out.mkdir(parents=True, exist_ok=True)
    study = STUDIES[args.name][args.preset]
    rows = run_study(study, out, args.overrides)
    markdown = write_tables(rows, out)
    figure(study, rows, out / "figure.png")
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=2))
    print(f"\n{markdown}\n\ntable: {out / 'table.md'} (and table.csv)  figure: "
          f"{out / 'figure.png'}  wall: {time.perf_counter() - start:.0f} s")
    return 0
