"""Make a directory unwritable for the duration of a test, also for root.

Root ignores permission bits, so as root the directory gets the immutable attribute
(``chattr +i``: no entry can be created, renamed or removed in it, EPERM); other users get
``chmod a-w`` (EACCES). Where neither works (no CAP_LINUX_IMMUTABLE, a filesystem without
attributes) the test is skipped. The original state is restored on exit (if the directory is
still there: as a non-root user it can be removed, empty, through its writable parent).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` (a directory) refuses new entries and removals inside the block."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:  # the code under test may have removed it (a parent directory stays writable)
            with contextlib.suppress(FileNotFoundError):
                path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0
    if not done:
        pytest.skip("running as root without chattr +i: cannot make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run([str(chattr), "-i", str(path)], check=True)
