"""A small file system the test makes, to fill for real (``ENOSPC``, ``SQLITE_FULL``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_file_system(directory: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``directory`` (created) for the block.

    Skips the test, saying why, where mounting is not permitted (not root, no
    ``mount``, a container without CAP_SYS_ADMIN). The tests that need no privilege
    make a full disk with SQLite's ``max_page_count`` instead.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the max_page_count tests cover this")
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here; the max_page_count tests cover this")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"mounting a tmpfs is not permitted here: {exc.stderr.strip()}")
    try:
        yield directory
    finally:
        # Lazy: a file still open (a relay being torn down) must not fail the test.
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
