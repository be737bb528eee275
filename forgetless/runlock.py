"""One writer per run directory: an exclusive file lock on run_dir/.lock.

Two jobs training into one run directory (a resubmitted sweep element while its requeued
twin is pending) would delete each other's checkpoints. The main rank takes a non-blocking
`flock` on run_dir/.lock and writes who holds it (host, pid, SLURM job, start time) into the
file; every rank learns the outcome, so all fail together. The kernel drops the lock when the
process ends, kill -9 included, so a dead holder never blocks a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from forgetless.errors import UserError

LOCK_NAME = ".lock"
# A holder() probe holds the lock for an instant: retry before calling the directory busy.
ATTEMPTS, PAUSE_S = 5, 0.05


class RunDirBusy(UserError):
    pass


class RunLock:
    """The held lock on one run directory; released by release() or when the process ends."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir = run_dir
        self.fd = fd  # None on the ranks that do not hold it themselves
        if fd is not None:  # forked children (loader workers) must not keep it alive
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._forget()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_info() -> dict:
    """Who this process is, as a lock file records it."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if job:
        info["slurm_job"] = job
    return info


def describe(info: dict) -> str:
    """'host H, pid P, SLURM job J' of a holder (what is known of it)."""
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"SLURM job {info['slurm_job']}")
    return ", ".join(parts)


def _try_lock(fd: int) -> bool:
    for attempt in range(ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < ATTEMPTS:
                time.sleep(PAUSE_S)
    return False


def _read_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except json.JSONDecodeError:  # the holder is writing it this very moment
        return {}
    return info if isinstance(info, dict) else {}


def _lock_main(run_dir: Path) -> tuple[int | None, str | None]:
    """(fd, None) with the lock taken and this process recorded, or (None, why it is busy)."""
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        info = _read_info(fd)
        os.close(fd)
        return None, (f"run_dir {run_dir} is in use by another trainer ({describe(info)}); "
                      f"wait for it to end, stop it, or use another run_dir")
    data = json.dumps(holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return fd, None


def acquire(run_dir: Path) -> RunLock:
    """Every rank calls this; the main rank locks run_dir (which must exist). Raises RunDirBusy
    on every rank, naming the holder, when another live process holds it."""
    run_dir = Path(run_dir)
    shared = dist.is_initialized() and dist.get_world_size() > 1
    fd, busy = None, None
    if not shared or dist.get_rank() == 0:
        fd, busy = _lock_main(run_dir)
    if shared:
        box = [busy]
        dist.broadcast_object_list(box, src=0)
        busy = box[0]
    if busy is not None:
        raise RunDirBusy(busy)
    return RunLock(run_dir, fd)


def holder(run_dir: Path) -> dict | None:
    """What the lock file says of its holder if a live process holds run_dir's lock now
    (empty if it is still writing it), else None. Takes nothing: the probe is released at once."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
