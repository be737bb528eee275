"""Atomic writes: nothing half-written is ever left under a final name, and what is published
is on disk (fsync'd) before its name says it is complete."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

# renameat2(2) flags and the "current directory" dirfd (Linux, <linux/fs.h>, <fcntl.h>)
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# errors by which a filesystem (or kernel, or libc) says it cannot exchange two names
NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under root (root included) on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder, name))
        fsync_dir(Path(folder))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step (Linux renameat2); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a libc without it (glibc < 2.28, musl)
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_stale(final: Path, keep: Path | None = None) -> None:
    """Leftovers of killed publishers of final's name (.NAME.tmp-PID, .NAME.old-PID), except
    keep. Call under the lock that serialises publishers of that name."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            if stale != keep:
                _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written directory visible under its final name, fsync'd, replacing an old
    one in one step: there is never a moment without a directory at the final name. Where the
    filesystem cannot exchange names, the old one is moved aside first (a brief window)."""
    fsync_tree(tmp)
    remove_stale(final, keep=tmp)
    old = None
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        old = tmp  # the exchange left the previous directory there
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)
