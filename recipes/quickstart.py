"""`forgetless quickstart`: the paper's method comparison on the built-in corpora.

Pretrain on stdlib-prose, sample self-generated replay, finetune on stdlib-code once per run
(method and replay source), then tabulate and plot forgetting. Stages already finished in
`out` are reused, so an interrupted quickstart continues where it stopped, but only with the
settings they were run with: a stage whose settings changed (the pretraining budget
included: the later stages were made from its checkpoint) is refused, naming the keys.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from forgetless import checkpoint, config, metrics  # noqa: E402
from forgetless.atomic import atomic_write_text  # noqa: E402
from forgetless.config import ConfigError, FinetuneConfig, QuickstartConfig  # noqa: E402
from forgetless.recipes import finetune, generate, pretrain  # noqa: E402

Finetune = tuple[str, str, list[str]]  # name, method[:replay], finetune key=value overrides

# Settings that do not change what a stage computes: where it lives (fixed by out; the base
# checkpoint is compared by its hash), the machine, the parallel layout, checkpointing.
UNCOMPARED = ("run_dir", "checkpoint", "replay.data", "cache_dir", "threads", "resume",
              "parallel.", "preempt.", "ckpt.", "kernels.", "data_opts.workers")
SCHEMAS = {"pretrain": config.PretrainConfig, "finetune": FinetuneConfig}


class StageChanged(ConfigError):
    pass


@dataclass
class Stage:
    """A stage's directory under out, its quickstart section (pretrain, generate, finetune)
    and its resolved settings, flattened to dotted keys."""

    directory: Path
    section: str
    settings: dict


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def default_finetunes(cfg: QuickstartConfig) -> list[Finetune]:
    """The quickstart's runs, each named `method[-replay source]`."""
    named = []
    for spec in cfg.runs:
        method, _, source = spec.partition(":")
        named.append((f"{method}-{source}" if source and source != "none" else method, spec, []))
    return named


def finetune_config(cfg: QuickstartConfig, run: Finetune, out: Path) -> FinetuneConfig:
    """The finetune (`method[:replay source]`, then its overrides) of out/pretrain."""
    name, spec, overrides = run
    values = config.to_dict(cfg.finetune.for_run(spec, str(out / "replay")))
    values.update(run_dir=str(out / f"finetune-{name}"), checkpoint=str(out / "pretrain"))
    return config.load_dict(FinetuneConfig, values, overrides)


def _generate_config(cfg: QuickstartConfig, out: Path) -> config.GenerateConfig:
    return config.load_dict(config.GenerateConfig, {**config.to_dict(cfg.generate),
                                                    "checkpoint": str(out / "pretrain"),
                                                    "out": str(out / "replay")})


def _pretrain_config(cfg: QuickstartConfig, out: Path) -> config.PretrainConfig:
    return config.load_dict(config.PretrainConfig,
                            {**config.to_dict(cfg.pretrain), "run_dir": str(out / "pretrain")})


def stages(cfg: QuickstartConfig, out: Path, runs: list[Finetune]) -> list[Stage]:
    """Every stage of the pipeline in out, with the settings it runs with."""
    pre, gen = _pretrain_config(cfg, out), _generate_config(cfg, out)
    found = [Stage(Path(pre.run_dir), "pretrain", config.flat(config.to_dict(pre))),
             Stage(Path(gen.out), "generate", config.flat(config.to_dict(gen)))]
    for run in runs:
        fine = finetune_config(cfg, run, out)
        found.append(Stage(Path(fine.run_dir), "finetune", config.flat(config.to_dict(fine))))
    return found


def _stored(stage: Stage) -> dict | None:
    """The settings a stage that has something to reuse was run with (None: nothing to
    reuse): a training run's config.json, or the generation plan of its replay."""
    if stage.section == "generate":
        path = stage.directory / generate.PLAN
        if not path.exists():
            return None
        plan = json.loads(path.read_text())
        first, end = plan["sample_ids"]
        return config.flat({"seed": plan["seed"], "sampling": plan["sampling"], "first_id": first,
                      "samples": end - first, "shard_samples": plan["shard_samples"]})
    path = stage.directory / "config.json"
    started = checkpoint.latest(stage.directory) or (stage.directory / "result.json").exists()
    if not (started and path.exists()):
        return None
    # a key newer than the stored config: the run had what is now its default
    return {**config.flat(config.to_dict(SCHEMAS[stage.section]())), **config.flat(json.loads(
        path.read_text()))}


def check(stages: list[Stage], out: Path) -> None:
    """Refuse to reuse a stage whose stored settings differ from the ones asked for now."""
    for stage in stages:
        stored = _stored(stage)
        if stored is None:
            continue
        changed = [k for k in stored if k in stage.settings and stored[k] != stage.settings[k]
                   and not k.startswith(UNCOMPARED)]
        if changed:
            was = ", ".join(f"{stage.section}.{k}={stored[k]}" for k in changed)
            now = ", ".join(f"{stage.section}.{k}={stage.settings[k]}" for k in changed)
            raise StageChanged(f"stage {stage.directory.name} in {out} was run with {was}, now "
                               f"{now}; use another output directory or remove "
                               f"{stage.directory}")


def _check_base(run_dir: Path, base_hash: str) -> None:
    """A stored finetune result counts only if it was finetuned from today's out/pretrain."""
    found = checkpoint.latest(run_dir)
    if found is not None and checkpoint.read_state(found).get("base_hash") != base_hash:
        raise StageChanged(f"stage {run_dir.name} in {run_dir.parent} was finetuned from "
                           f"another pretrained checkpoint than {run_dir.parent / 'pretrain'}; "
                           f"use another output directory or remove {run_dir}")


def finetune_stage(cfg: QuickstartConfig, run: Finetune, out: Path, base_hash: str) -> dict:
    """One finetune of out/pretrain (whose checkpoint hashes to base_hash), or its stored
    result."""
    fine = finetune_config(cfg, run, out)
    run_dir = Path(fine.run_dir)
    _check_base(run_dir, base_hash)
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    _stage(f"finetune {run[0]} on {cfg.finetune.data}")
    start = time.perf_counter()
    final = finetune.run(fine)
    history = [r for r in metrics.read(run_dir / "metrics.jsonl") if "prev_ntp" in r]
    result = {
        "method": fine.method, "replay": fine.replay.source, "valid_ntp": final["valid_ntp"],
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


def pretrain_stage(cfg: QuickstartConfig, out: Path) -> str:
    """out/pretrain and its self-generated replay out/replay (each reused when finished); the
    content hash of the pretrained checkpoint."""
    _stage(f"pretrain on {cfg.pretrain.data}")
    pretrain.run(_pretrain_config(cfg, out))
    if not (out / "replay" / "manifest.json").exists():
        _stage("generate self-replay")
    generate.run(_generate_config(cfg, out))
    return checkpoint.content_hash(checkpoint.latest(out / "pretrain"))


def run(cfg: QuickstartConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out)
    runs = default_finetunes(cfg)
    check(stages(cfg, out, runs), out)
    out.mkdir(parents=True, exist_ok=True)
    base_hash = pretrain_stage(cfg, out)
    results = [finetune_stage(cfg, run, out, base_hash) for run in runs]
    atomic_write_text(out / "results.json", json.dumps(
        [{k: v for k, v in r.items() if k not in ("curve", "steps")} for r in results],
        indent=2))
    plot(results, out / "forgetting.png")
    print("\n" + table(results))
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'forgetting.png'}")
    return {"results": str(out / "results.json"), "plot": str(out / "forgetting.png"),
            "wall_s": round(time.perf_counter() - start, 1)}
