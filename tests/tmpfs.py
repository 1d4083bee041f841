"""A small real tmpfs for the storage-fault tests: a disk that fills up, or goes read-only, on demand.

Mounting needs root (the test machines run the suite as root); elsewhere the tests that need it are skipped
with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str = "4m") -> Iterator[Path]:
    """Mount a tmpfs of `size` on `mountpoint` (made if missing), yield it, unmount it."""
    if os.geteuid() != 0:
        pytest.skip("a tmpfs mount needs root")
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        # lazy: a process the test started may still hold a file there for a moment
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(mountpoint: Path) -> Path:
    """Write a ballast file until the file system is full (ENOSPC); return it (delete it to free the space)."""
    ballast = mountpoint / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12):  # large blocks, then the last pages
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return ballast


def remount(mountpoint: Path, mode: str) -> None:
    """`mode` "ro" or "rw": a disk that goes read-only under the job, and back."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True, capture_output=True)
