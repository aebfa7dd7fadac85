"""Ids of files and jobs: a prefix and 16 random bytes, URL-safe base64."""

from __future__ import annotations

import re
import secrets

FILE_ID_PATTERN = r"^f_[A-Za-z0-9_-]{16,64}$"
JOB_ID_PATTERN = r"^j_[A-Za-z0-9_-]{16,64}$"
FILE_ID_RE = re.compile(FILE_ID_PATTERN)
JOB_ID_RE = re.compile(JOB_ID_PATTERN)


def new_file_id() -> str:
    return "f_" + secrets.token_urlsafe(16)


def new_job_id() -> str:
    return "j_" + secrets.token_urlsafe(16)


def new_run_id(job_id: str) -> str:
    """The RQ job id of one run of ``job_id``: ``<job id>_r<random>``."""
    return f"{job_id}_r{secrets.token_hex(4)}"
