"""One node's processes: torchrun around `python -m forgetless <program>`, with the
preemption signals forwarded to its workers and their exit code passed on.

torchrun neither forwards SIGUSR1/SIGUSR2 (they would kill it) nor keeps its workers' exit
codes (any failure exits 1). This wrapper does both, so that a scheduler's signal reaches
every rank (which checkpoint at one agreed step and exit with preempt.exit_code) and the
batch script sees that code and can requeue.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def torchrun_command(nproc: int, program: list[str]) -> list[str]:
    """torchrun on this node alone (multi-node jobs get theirs from `slurm.render`)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", "-m", "forgetless", *program]


def run(command: list[str], preempt_exit_code: int = 75) -> int:
    """Run torchrun; on a forwarded signal a failed exit becomes preempt_exit_code."""
    proc = subprocess.Popen(command)
    received: list[int] = []

    def forward(number: int, _frame: object) -> None:
        received.append(number)
        try:  # the workers only: their own children (loader workers, writers) stay alone
            workers = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return
        for worker in workers:
            try:
                worker.send_signal(number)
            except psutil.NoSuchProcess:
                pass

    previous = {number: signal.signal(number, forward) for number in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if code != 0 and received:
        print(f"forgetless launch: preempted by {signal.Signals(received[0]).name}; exit code "
              f"{preempt_exit_code}", file=sys.stderr)
        return preempt_exit_code
    return code
