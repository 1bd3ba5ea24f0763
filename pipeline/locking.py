"""One job per output: exclusive `fcntl.flock` locks that name their holder.

A second job on the same output would delete the first one's temporary files and
interleave its writes, so every stage that writes an output takes a lock file in it
first and refuses to start when another process holds it, naming that process's PID,
host and command. `flock` locks vanish with their process (also on SIGKILL), so a
crashed job never leaves a stale lock behind; on Linux NFS clients they are emulated
with byte-range locks and hold across machines.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .utils import PipelineError


class OutputLocked(PipelineError):
    """Another job holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder


def holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no record"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started')} ({holder.get('command')})")


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        holder = json.loads(data.decode("utf-8", "replace")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


class Lock:
    """A held lock; `release()` (or leaving its `with` block) lets the next job in."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(path: str | os.PathLike, what: str) -> Lock:
    """Take the exclusive lock `path` without waiting, or raise OutputLocked naming the
    holder. `what` names the output in the message (e.g. "--output runs/x")."""
    path = Path(path)
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise OutputLocked(f"{what} is in use by another job: {describe_holder(holder)}; "
                           f"wait for it to finish, or choose another output "
                           f"(lock file {path})", holder) from None
    except OSError as e:
        os.close(fd)
        raise PipelineError(f"cannot lock {path} ({e.strerror}): the file system of {what} "
                            f"must support flock") from None
    record = (json.dumps(holder_record()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return Lock(path, fd)


def holder_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record if some process holds lock `path` now, else None (free or absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def mutex(path: str | os.PathLike) -> Iterator[None]:
    """A short critical section (blocking): e.g. check other jobs' locks, then take one."""
    fd = _open(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
