"""One writer per run folder: an advisory lock on the folder itself, held for the whole run.

A job restarted by a scheduler while the old one still lives, or a second `--resume latest` typed by hand, used to
run beside the first on the same `--out`: both wrote checkpoints and the student, and both exited 0. Every command
that writes a run folder (`train`, `demo`, `run`, `distill`, `evaluate`) now holds `run_lock(out)` while it works;
a second writer is refused at once (exit 2) with the process that holds the folder. The lock is a POSIX flock on
the folder's own file descriptor, so no file is added to the folder, and the kernel releases it when its process
ends, however it ends: a lock left by a dead process never blocks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from proreflow.errors import ProReflowError


def _holder(folder: Path) -> str:
    """' (pid N: its command line)' of the process that holds the folder's flock, from /proc/locks (Linux), else ''."""
    try:
        st = os.stat(folder)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if "FLOCK" in parts and parts[-3] == dev:
                pid = parts[-4]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f" (pid {pid}: {cmd[:160]})" if cmd else f" (pid {pid})"
    except (OSError, ValueError, IndexError):
        pass
    return ""


@contextmanager
def run_lock(folder: str | Path, enabled: bool = True) -> Iterator[None]:
    """Make `folder` (if needed) and hold its lock until the block ends; ProReflowError if another process holds
    it. `enabled=False` (the non-main processes of one launch, which share the main process's folder) does
    nothing. Take it after validation: it is the first thing a run writes."""
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): one writer per folder is up to the user
        yield
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProReflowError(f"{str(path)!r} is being written by another process{_holder(path)}; wait for it "
                                 f"to end or choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock
