"""The `forgetless` command: `forgetless <program> [recipe] [key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

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
    "export": ("export:run", config.ExportConfig, "write a checkpoint as a Hugging Face model"),
    "data prepare": ("prepare:run", config.PrepareConfig, "tokenize a source into shards"),
    "data tokenizer": ("prepare:train_tokenizer", config.TokenizerConfig,
                       "train a BPE tokenizer on sources"),
}


# programs with their own flags: launch local|slurm|node, sweep, study
TOOLS = {"launch": "launch.cli:launch", "sweep": "launch.cli:run_sweep",
         "study": "recipes.study:main"}
TOOL_HELP = {"launch": "run a program under torchrun (local) or SLURM",
             "sweep": "run a grid of settings, locally or as a SLURM job array",
             "study": "one of the paper's studies: runs, table and figure"}
HELP_FLAGS = ("--help", "-h")
PRINT_CONFIG = "--print-config"


def _parser() -> argparse.ArgumentParser:
    listing = [f"  {name:<16}{summary}" for name, (_, _, summary) in PROGRAMS.items()]
    listing += [f"  {name:<16}{summary}" for name, summary in TOOL_HELP.items()]
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Pretrain, finetune and release language models that forget less.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="programs:\n" + "\n".join(listing) + "\n\nSettings are key=value (e.g. "
        "model.hidden=128); a first argument ending in .yaml, or a recipe name, sets "
        "defaults.\n`forgetless <program> --help` lists a program's settings; "
        "--print-config prints them resolved, without running.",
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


def _split_program(args: list[str]) -> tuple[str, list[str]]:
    """(program, its arguments): `data prepare ...` / `data tokenizer ...` included."""
    program, rest = args[0], list(args[1:])
    if program == "data":
        program = f"data {rest.pop(0) if rest else ''}"
        if program not in PROGRAMS:
            raise UserError("expected `data prepare` or `data tokenizer`")
    return program, rest


def _load(program: str, args: list[str]) -> object:
    rest = _settings(args)
    recipe = rest.pop(0) if rest and "=" not in rest[0] else None
    return config.load(PROGRAMS[program][1], recipe, rest)


def program_config(args: list[str]) -> tuple[str, str, object]:
    """(program, its recipes module:function, its validated config) from
    `program [recipe] key=value ...` (`data prepare ...` / `data tokenizer ...` included)."""
    program, rest = _split_program(args)
    return program, PROGRAMS[program][0], _load(program, rest)


def program_help(program: str) -> str:
    """Usage, and every setting with its default and one line of help."""
    _, schema, summary = PROGRAMS[program]
    rows = config.describe(schema)
    key_width = max(len(key) for key, _, _ in rows) + 2
    default_width = min(max(len(default) for _, default, _ in rows), 20)
    lines = [f"usage: forgetless {program} [recipe] [key=value ...] [{PRINT_CONFIG}]", "",
             f"{summary[0].upper()}{summary[1:]}. A recipe is a YAML file of these settings "
             f"or a shipped one ({', '.join(config.recipe_names())}); key=value settings "
             f"override it.", "", "settings (key, default, meaning):"]
    lines += [f"  {key:<{key_width}}{default:<{default_width}}  {text}" if default
              else f"  {key:<{key_width}}{text}" for key, default, text in rows]
    return "\n".join(lines)


def _data_help() -> str:
    return "usage: forgetless data prepare|tokenizer [key=value ...]\n\n" + "\n".join(
        f"  {name:<16}{PROGRAMS[name][2]}" for name in PROGRAMS if name.startswith("data "))


def is_main_rank() -> bool:
    """Global rank 0 (torchrun's RANK), or a process started without torchrun."""
    return os.environ.get("RANK", "0") == "0"


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
    if program == "data" and argv[1:2] and argv[1] in HELP_FLAGS:
        print(_data_help())
        return 0
    try:
        program, rest = _split_program(argv)
        if any(arg in HELP_FLAGS for arg in rest):
            print(program_help(program))
            return 0
        cfg = _load(program, [arg for arg in rest if arg != PRINT_CONFIG])
        if PRINT_CONFIG in rest:
            print(config.to_yaml(cfg), end="")
            return 0
        module, function = PROGRAMS[program][0].split(":")
        result = getattr(importlib.import_module(f"forgetless.recipes.{module}"), function)(cfg)
    except UserError as e:
        print(f"forgetless {program}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"forgetless {program}: {e}; exit code {e.exit_code}", file=sys.stderr)
        return e.exit_code
    finally:
        if "forgetless.parallel" in sys.modules:  # a program ran: end its world
            sys.modules["forgetless.parallel"].shutdown()
    if is_main_rank():
        print(json.dumps(result, indent=2))
    return 0
