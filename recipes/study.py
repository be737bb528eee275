"""`forgetless study <name>`: the paper's studies from your own runs.

Each study is a sweep over pretraining variants (each pretrained once, with its own
self-generated replay) and finetuning variants of the quickstart pipeline, then an
aggregation: `table.csv`, `table.md` and `figure.png` in the output directory. Finished stages
are reused, so an interrupted study continues. Presets: `cpu` (sized for a 2-core machine)
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
    finetune_stage,
    plot,
    pretrain_stage,
    save_figure,
)

Finetune = tuple[str, str, list[str]]  # name, method[:replay], finetune key=value overrides


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


def _value(overrides: list[str], key: str, default: object) -> object:
    found = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return float(found[-1]) if found else default


def run_study(study: Study, out: Path, overrides: list[str]) -> list[dict]:
    rows = []
    for pname, pre in study.pretrains.items():
        cfg = config.load(QuickstartConfig, None, [*study.base, *pre, *overrides])
        where = out / pname
        where.mkdir(parents=True, exist_ok=True)
        pretrain_stage(cfg, where)
        params = checkpoint.read_state(checkpoint.latest(where / "pretrain"))["params"]
        for fname, spec, fine in study.finetunes:
            result = finetune_stage(cfg, spec, where, fname, fine)
            rows.append({"pretrain": pname, "finetune": fname, "params": params,
                         "lr": _value(fine, "opt.lr", cfg.finetune.opt.lr), **result})
    return rows


def figure(study: Study, rows: list[dict], path: Path) -> None:
    if not study.x:
        plot(rows, path)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(" ".join(str(row[c]) for c in study.series), []).append(row)
    for label, points in lines.items():
        points.sort(key=lambda r: r[study.x])
        ax.plot([r[study.x] for r in points], [r["forgetting"] for r in points], marker="o",
                label=label)
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
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "table.csv", table.getvalue())
    markdown = "\n".join(["| " + " | ".join(COLUMNS) + " |",
                          "|" + " --- |" * len(COLUMNS)] +
                         ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows])
    atomic_write_text(out / "table.md", markdown + "\n")
    return markdown


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forgetless study", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(STUDIES))
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    out = Path(args.out or f"runs/studies/{args.name}-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    study = STUDIES[args.name][args.preset]
    rows = run_study(study, out, args.overrides)
    markdown = write_tables(rows, out)
    figure(study, rows, out / "figure.png")
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=2))
    print(f"\n{markdown}\n\ntable: {out / 'table.md'} (and table.csv)  figure: "
          f"{out / 'figure.png'}  wall: {time.perf_counter() - start:.0f} s")
    return 0
