"""`forgetless quickstart`: the paper's method comparison on the built-in corpora.

Pretrain on stdlib-prose, sample self-generated replay, finetune on stdlib-code once per run
(method and replay source), then tabulate and plot forgetting. Stages already finished in
`out` are reused, so an interrupted quickstart continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from forgetless import config, metrics  # noqa: E402
from forgetless.atomic import atomic_write_text  # noqa: E402
from forgetless.config import FinetuneConfig, QuickstartConfig  # noqa: E402
from forgetless.recipes import finetune, generate, pretrain  # noqa: E402


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def finetune_stage(cfg: QuickstartConfig, spec: str, out: Path, name: str = "",
                   overrides: list[str] = ()) -> dict:
    """One finetune (`method[:replay source]`, then key=value overrides) of out/pretrain, or
    its stored result."""
    method, _, source = spec.partition(":")
    source = source or "none"
    name = name or (f"{method}-{source}" if source != "none" else method)
    run_dir = out / f"finetune-{name}"
    values = config.to_dict(cfg.finetune)
    values.update(run_dir=str(run_dir), checkpoint=str(out / "pretrain"), method=method)
    values["replay"].update(source=source, data=str(out / "replay") if source == "self" else "")
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    _stage(f"finetune {name} on {cfg.finetune.data}")
    start = time.perf_counter()
    final = finetune.run(config.load_dict(FinetuneConfig, values, overrides))
    history = [r for r in metrics.read(run_dir / "metrics.jsonl") if "prev_ntp" in r]
    result = {
        "method": method, "replay": source, "valid_ntp": final["valid_ntp"],
        "prev_ntp": final["prev_ntp"], "prev_ntp_before": history[0]["prev_ntp"],
        "forgetting": final["prev_ntp"] - history[0]["prev_ntp"],
        "wall_s": round(time.perf_counter() - start, 1),
        "steps": final["step"],
        "curve": [[r["valid_ntp"], r["prev_ntp"]] for r in history],
    }
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    rows = [f"{'method':<10}{'replay':<8}{'valid_ntp':>10}{'prev_ntp':>10}{'forgetting':>12}"
            f"{'wall_s':>9}"]
    rows += [f"{r['method']:<10}{r['replay']:<8}{r['valid_ntp']:>10.3f}{r['prev_ntp']:>10.3f}"
             f"{r['forgetting']:>12.3f}{r['wall_s']:>9.1f}" for r in results]
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    """Previous-distribution loss against downstream loss along each run (paper figure 1)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        label = r["method"] + (f" ({r['replay']} replay)" if r["replay"] != "none" else "")
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.axhline(results[0]["prev_ntp_before"], color="gray", linestyle=":", linewidth=1,
               label="before finetuning")
    ax.invert_xaxis()
    ax.set_xlabel("downstream loss (stdlib-code valid_ntp)")
    ax.set_ylabel("previous loss (stdlib-prose prev_ntp)")
    ax.set_title("Forgetting along finetuning")
    save_figure(fig, ax, path)


def save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    """Legend, layout, and an atomic write of the PNG."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def pretrain_stage(cfg: QuickstartConfig, out: Path) -> None:
    """out/pretrain and its self-generated replay out/replay (each reused when finished)."""
    _stage(f"pretrain on {cfg.pretrain.data}")
    pre = config.load_dict(config.PretrainConfig,
                           {**config.to_dict(cfg.pretrain), "run_dir": str(out / "pretrain")})
    pretrain.run(pre)
    if not (out / "replay" / "manifest.json").exists():
        _stage("generate self-replay")
    gen = config.load_dict(config.GenerateConfig, {**config.to_dict(cfg.generate),
                                                   "checkpoint": str(out / "pretrain"),
                                                   "out": str(out / "replay")})
    generate.run(gen)


def run(cfg: QuickstartConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain_stage(cfg, out)
    results = [finetune_stage(cfg, spec, out) for spec in cfg.runs]
    atomic_write_text(out / "results.json", json.dumps(
        [{k: v for k, v in r.items() if k not in ("curve", "steps")} for r in results],
        indent=2))
    plot(results, out / "forgetting.png")
    print("\n" + table(results))
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'forgetting.png'}")
    return {"results": str(out / "results.json"), "plot": str(out / "forgetting.png"),
            "wall_s": round(time.perf_counter() - start, 1)}
