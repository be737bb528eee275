"""sbatch scripts: one torchrun per node started by srun, rendezvous from the SLURM
environment, the preemption signal forwarded to every rank, requeue on the preemption exit
code. A job array runs one element (a list of program arguments) per task."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from forgetless.atomic import atomic_write_text
from forgetless.errors import UserError

JOB_FILE = "slurm-job"  # in each run directory: the job (`J`) or array task (`J_T`) submitted

TEMPLATE = Template("""#!/bin/bash
#SBATCH --job-name=$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=$cpus
#SBATCH --time=$time
#SBATCH --chdir=$workdir
#SBATCH --output=$log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@$grace
$directives
# Rendered by `forgetless launch slurm`. Each node's task runs torchrun (node rank and master
# from SLURM) under `forgetless launch node`, which forwards preemption signals to the ranks.
# They checkpoint at one agreed step and exit $exit_code; the job then requeues itself and
# resumes (resume=auto) from that checkpoint.
set -u
$select
export MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=$threads
TORCHRUN=$torchrun
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c "$$TORCHRUN \\"\\$$@\\"" _ "$${ARGS[@]}" &
step=$$!
trap 'kill -USR1 "$$step" 2>/dev/null' USR1 TERM
while true; do
    wait "$$step"
    rc=$$?
    kill -0 "$$step" 2>/dev/null || break
done
mkdir -p "$$RUN_DIR" && echo "$$rc" > "$$RUN_DIR/.launch-exit-code.tmp" &&
    mv "$$RUN_DIR/.launch-exit-code.tmp" "$$RUN_DIR/launch-exit-code"
if [ "$$rc" -eq $exit_code ]; then
    echo "preempted: requeueing job $$SLURM_JOB_ID"
    scontrol requeue "$$SLURM_JOB_ID"
fi
exit "$$rc"
""")


@dataclass
class Job:
    name: str
    elements: list[list[str]]  # program arguments, one list per array task (or one job)
    run_dirs: list[str]  # where each element writes (its log and exit code go there too)
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU ranks
    nproc_per_node: int = 1  # ranks per node on CPU (with GPUs: one per GPU)
    cpus_per_task: int = 0  # 0: one per rank
    time: str = "04:00:00"
    grace_s: int = 120  # SIGUSR1 this long before the time limit
    partition: str = ""
    account: str = ""
    exit_code: int = 75
    extra: list[str] = field(default_factory=list)  # further #SBATCH options

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.nproc_per_node < 1:
            raise UserError("launch slurm: nodes and nproc must be >= 1, gpus >= 0")
        if not self.elements or len(self.elements) != len(self.run_dirs):
            raise UserError("launch slurm: nothing to run")


def _quote_array(args: list[str]) -> str:
    return "(" + " ".join(shlex.quote(a) for a in args) + ")"


def render(job: Job) -> str:
    ranks = job.gpus_per_node or job.nproc_per_node
    torchrun = " ".join([
        shlex.quote(sys.executable), "-m", "forgetless", "launch", "node",
        f"--preempt-exit-code={job.exit_code}", "--", shlex.quote(sys.executable), "-m",
        "torch.distributed.run", "--nnodes=$SLURM_JOB_NUM_NODES", "--node_rank=$SLURM_NODEID",
        f"--nproc_per_node={ranks}", "--master_addr=$MASTER_ADDR", "--master_port=$MASTER_PORT",
        "-m", "forgetless"])
    directives = []
    if job.gpus_per_node:
        directives.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.partition:
        directives.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        directives.append(f"#SBATCH --account={job.account}")
    if len(job.elements) > 1:
        directives.append(f"#SBATCH --array=0-{len(job.elements) - 1}")
        cases = "\n".join(f"    {i}) ARGS={_quote_array(args)}; RUN_DIR={shlex.quote(run_dir)} ;;"
                          for i, (args, run_dir) in enumerate(zip(job.elements, job.run_dirs,
                                                                  strict=True)))
        select = f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}\nesac'
        log = str(Path(job.run_dirs[0]).parent / "slurm-%A_%a.out")
    else:
        select = f"ARGS={_quote_array(job.elements[0])}\nRUN_DIR={shlex.quote(job.run_dirs[0])}"
        log = str(Path(job.run_dirs[0]) / "slurm-%j.out")
    directives += [f"#SBATCH {option}" for option in job.extra]
    cpus = job.cpus_per_task or ranks
    return TEMPLATE.substitute(
        name=job.name, nodes=job.nodes, cpus=cpus, time=job.time, workdir=Path.cwd(), log=log,
        grace=job.grace_s, directives="\n".join(directives), exit_code=job.exit_code,
        select=select, threads=max(cpus // ranks, 1), torchrun=shlex.quote(torchrun))


def submit(job: Job, script_path: Path) -> str:
    """Write the script beside the runs and sbatch it, and record in each run directory the
    job (or array task) that will run it; the job id."""
    for run_dir in job.run_dirs:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    script_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script_path, render(job))
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True,
                             text=True)
    except FileNotFoundError as e:
        raise UserError("launch slurm: sbatch not found (is this a SLURM cluster?)") from e
    if out.returncode != 0:
        raise UserError(f"launch slurm: sbatch failed: {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    for task, run_dir in enumerate(job.run_dirs):
        recorded = f"{job_id}_{task}" if len(job.run_dirs) > 1 else job_id
        atomic_write_text(Path(run_dir) / JOB_FILE, f"{recorded}\n")
    return job_id


def queue() -> dict[str, str]:
    """Every queued job and array task (`J`, `J_T`) -> its state (PENDING, RUNNING, ...);
    empty where there is no SLURM."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True,
                             text=True)
    except FileNotFoundError:
        return {}
    if out.returncode != 0:  # not knowing what is queued, a resubmission could run it twice
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
