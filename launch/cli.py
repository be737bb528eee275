"""`forgetless launch local|slurm|node` and `forgetless sweep`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from forgetless.atomic import atomic_write_text
from forgetless.cli import PROGRAMS, program_config
from forgetless.errors import UserError
from forgetless.launch import node, slurm, sweep


def _slurm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="CPU ranks per node")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="0: one per rank")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--grace", type=int, default=120,
                        help="seconds before the time limit at which SIGUSR1 asks to checkpoint")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--sbatch", action="append", default=[],
                        help="a further #SBATCH option, e.g. --sbatch=--qos=high")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def _job(args: argparse.Namespace, name: str, elements: list[list[str]],
         run_dirs: list[str]) -> slurm.Job:
    return slurm.Job(name=name, elements=elements, run_dirs=run_dirs, nodes=args.nodes,
                     gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                     cpus_per_task=args.cpus_per_task, time=args.time, grace_s=args.grace,
                     partition=args.partition, account=args.account, extra=args.sbatch)


def _run_dir(where: str, program_args: list[str]) -> str:
    """Where the program writes (its run_dir, or out), as its own config resolves it; a program
    that cannot be launched is refused here, once, rather than by every rank of the job."""
    name = program_args[0]
    if name == "sweep":
        raise UserError(f"launch {where}: a sweep launches its own runs: `forgetless sweep FILE "
                        f"--slurm` submits them as one job array, `--nproc N` runs them here")
    launchable = sorted({p.split()[0] for p in PROGRAMS} | {"study"})
    if name not in launchable:
        raise UserError(f"launch {where}: cannot launch {name!r}; programs: "
                        f"{', '.join(launchable)}")
    if name == "study":
        from forgetless.recipes import study  # megatron and matplotlib: only when needed

        return str(study.out_dir(program_args[1:]))
    program, _, cfg = program_config(program_args)
    return getattr(cfg, "run_dir", "") or getattr(cfg, "out", "") or f"runs/{program}"


def _submit(args: argparse.Namespace, job: slurm.Job, script: Path) -> int:
    if args.dry_run:
        print(slurm.render(job))
        return 0
    print(f"submitted job {slurm.submit(job, script)} ({script})")
    return 0


def launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forgetless launch")
    sub = parser.add_subparsers(dest="where", required=True)
    local = sub.add_parser("local", help="run a program under torchrun on this machine")
    local.add_argument("--nproc", type=int, default=1)
    local.add_argument("program", nargs=argparse.REMAINDER)
    batch = sub.add_parser("slurm", help="render and submit an sbatch script")
    _slurm_options(batch)
    batch.add_argument("program", nargs=argparse.REMAINDER)
    one = sub.add_parser("node", help="(inside a job) run a command, forwarding signals")
    one.add_argument("--preempt-exit-code", type=int, default=75)
    one.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.where == "node":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return node.run(command, args.preempt_exit_code)
    if not args.program:
        parser.error("name a program, e.g. `pretrain key=value ...`")
    run_dir = _run_dir(args.where, args.program)
    if args.where == "local":
        return node.run(node.torchrun_command(args.nproc, args.program))
    job = _job(args, f"forgetless-{args.program[0]}", [args.program], [run_dir])
    return _submit(args, job, Path(run_dir) / "job.sbatch")


def _statuses(runs: list[sweep.Element]) -> dict[str, sweep.Status]:
    queue = slurm.queue() if any(r.job() for r in runs) else {}
    return {r.name: r.status(queue) for r in runs}


def _report(runs: list[sweep.Element], status: dict[str, sweep.Status]) -> int:
    """Every run's status; 1 if any failed."""
    for r in runs:
        print(f"{r.name:<40} {str(status[r.name]):<44} {r.run_dir}")
    return 1 if any(s.state == "failed" for s in status.values()) else 0


def run_sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forgetless sweep",
                                     description=sweep.__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the sweep YAML")
    parser.add_argument("--slurm", action="store_true", help="submit as one SLURM job array")
    parser.add_argument("--nproc", type=int, default=1, help="local: ranks per run (torchrun)")
    parser.add_argument("--status", action="store_true", help="report each run, run nothing")
    _slurm_options(parser)
    args = parser.parse_args(argv)
    spec = sweep.load(args.file)
    runs = sweep.elements(spec)
    status = _statuses(runs)
    active = [r for r in runs if status[r.name].active]
    todo = [r for r in runs if status[r.name].state != "finished" and r not in active]
    if args.status or not todo:
        return _report(runs, status)
    for r in active:
        print(f"{r.name}: {status[r.name]}; left alone")
    print(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo) - len(active)} "
          f"finished, {len(active)} running or pending, {len(todo)} to run")
    if args.slurm:
        job = _job(args, f"forgetless-{spec.name}", [r.args for r in todo],
                   [str(r.run_dir) for r in todo])
        return _submit(args, job, Path(spec.out) / f"{spec.name}.sbatch")
    for r in todo:
        _run_here(r, args.nproc)
    status = _statuses(runs)  # after running
    failed = [r for r in runs if status[r.name].state == "failed"]
    for r in failed:
        print(f"failed: {r.name} ({status[r.name]}); see {r.run_dir}", file=sys.stderr)
    return 1 if failed else 0


def _run_here(run: sweep.Element, nproc: int) -> None:
    """One element on this machine (unless another writer took it meanwhile), its exit code
    recorded; it is no longer the SLURM job's to run."""
    now = run.status()
    if now.active:
        print(f"{run.name}: {now}; left alone")
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / slurm.JOB_FILE).unlink(missing_ok=True)
    command = (node.torchrun_command(nproc, run.args) if nproc > 1
               else [sys.executable, "-m", "forgetless", *run.args])
    print(f"== {run.name}", flush=True)
    code = subprocess.run(command).returncode
    atomic_write_text(run.run_dir / "launch-exit-code", f"{code}\n")
