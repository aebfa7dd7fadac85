"""Where things lie in the data directory shared by the API and the workers.

<data_dir>/files/<file_id>            uploaded file content (committed by atomic rename)
<data_dir>/files/<file_id>.json       its FileRecord
<data_dir>/tmp/                       uploads in flight (same filesystem, so rename is atomic)
<data_dir>/jobs/<job_id>/attempt-<n>/ a run's working directory; served only once the job's
                                      record names it (``output_attempt``)
<data_dir>/valkey/                    the embedded server's data (``recalib serve`` only)
"""

from __future__ import annotations

from pathlib import Path


def files_dir(data_dir: Path) -> Path:
    return data_dir / "files"


def file_path(data_dir: Path, file_id: str) -> Path:
    """The content of an uploaded file."""
    return files_dir(data_dir) / file_id


def file_meta_path(data_dir: Path, file_id: str) -> Path:
    return files_dir(data_dir) / f"{file_id}.json"


def tmp_dir(data_dir: Path) -> Path:
    return data_dir / "tmp"


def job_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "jobs" / job_id


def attempt_dir(data_dir: Path, job_id: str, attempt: int) -> Path:
    """Working directory of one run of a job (see :mod:`recalib.files.artifacts`)."""
    return job_dir(data_dir, job_id) / f"attempt-{attempt}"


def valkey_dir(data_dir: Path) -> Path:
    return data_dir / "valkey"
