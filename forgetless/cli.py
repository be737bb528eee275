"""The `forgetless` command: `forgetless <program> [recipe] [key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch.distributed as dist

from forgetless import config
from forgetless.errors import Preempted, UserError

PROGRAMS = {
    # command: (module:function under forgetless.recipes, config schema, help)
    "quickstart": ("quickstart:run", config.QuickstartConfig,
                   "the whole pipeline and method comparison on the built-in corpora"),
    "pretrain": ("pretrain:run", config.PretrainConfig, "pretrain a GPT on token shards"),
    "evaluate": ("evaluate:run", config.EvaluateConfig, "validation loss of a checkpoint"),
    "generate": ("generate:run", config.GenerateConfig, "sample self-generated replay shards"),
    "finetune": ("finetune:run", config.FinetuneConfig, "finetune with or without replay"),
    "data prepare": ("prepare:run", config.PrepareConfig, "tokenize a source into shards"),
    "data tokenizer": ("prepare:train_tokenizer", config.TokenizerConfig,
                       "train a BPE tokenizer on sources"),
}


# programs with their own flags: launch local|slurm|node, sweep, study
TOOLS = {"launch": "launch.cli:launch", "sweep": "launch.cli:run_sweep",
         "study": "recipes.study:main"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Pretrain, finetune and release language models that forget less.",
        epilog="Programs: " + "; ".join(f"{k}: {v[2]}" for k, v in PROGRAMS.items())
        + ". Settings are key=value (e.g. "
        "model.hidden=128); a first argument ending in .yaml, or a recipe name, sets defaults.",
    )
    parser.add_argument("program", choices=sorted({p.split()[0] for p in PROGRAMS} | set(TOOLS)))
    parser.add_argument("args", nargs="*", help="[recipe] key=value ...")
    return parser


def _settings(args: list[str]) -> list[str]:
    """`--key value` and `--key=value` are accepted as `key=value`."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(args):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 2
            continue
        out.append(arg[2:] if arg.startswith("--") else arg)
        i += 1
    return out


def program_config(args: list[str]) -> tuple[str, str, object]:
    """(program, its recipes module:function, its validated config) from
    `program [recipe] key=value ...` (`data prepare ...` / `data tokenizer ...` included)."""
    program, rest = args[0], _settings(args[1:])
    if program == "data":
        program = f"data {rest.pop(0) if rest else ''}"
        if program not in PROGRAMS:
            raise UserError("expected `data prepare` or `data tokenizer`")
    target, schema, _ = PROGRAMS[program]
    recipe = rest.pop(0) if rest and "=" not in rest[0] else None
    return program, target, config.load(schema, recipe, rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv[:1])
    program = args.program
    if program in TOOLS:
        module, function = TOOLS[program].split(":")
        try:
            return getattr(importlib.import_module(f"forgetless.{module}"), function)(argv[1:])
        except UserError as e:
            print(f"forgetless {program}: error: {e}", file=sys.stderr)
            return 2
    try:
        program, target, cfg = program_config(argv)
        module, function = target.split(":")
        result = getattr(importlib.import_module(f"forgetless.recipes.{module}"), function)(cfg)
    except UserError as e:
        print(f"forgetless {program}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"forgetless {program}: {e}; exit code {e.exit_code}", file=sys.stderr)
        return e.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(result, indent=2))
    return 0
