"""Job artifacts on disk: each run of a job writes into a directory of its own.

``<data_dir>/jobs/<job id>/attempt-<n>/`` holds what run ``n`` wrote. Nothing is renamed: when a
run succeeds, :func:`recalib.jobs.states.finish_run` records its attempt in the job's record
(``output_attempt``) in the same conditional update that proves the run still owns the job, and
only that directory is ever served. A superseded run's directory is removed by that run, or by
retention with its job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recalib import layout
from recalib.contract import JobRecord

INPUTS_DIR = "inputs"
"""Inside an attempt directory: the run's inputs (links to the uploads), removed when it ends."""


class ArtifactStore:
    """The job directories under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        """Where run ``attempt`` of ``job_id`` writes (never served unless it succeeded)."""
        return layout.attempt_dir(self.data_dir, job_id, attempt)

    def output_dir(self, record: JobRecord) -> Path | None:
        """The artifacts of the run that succeeded; None when no run has."""
        if record.output_attempt is None:
            return None
        return self.attempt_dir(record.id, record.output_attempt)

    def prepare_attempt(self, job_id: str, attempt: int) -> Path:
        """An empty directory for run ``attempt`` (what an earlier try of it left is removed)."""
        path = self.attempt_dir(job_id, attempt)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def end_attempt(self, job_id: str, attempt: int, *, published: bool) -> None:
        """After a run: drop its inputs; drop everything it wrote unless it was published, and
        when it was, every other attempt's leftovers."""
        path = self.attempt_dir(job_id, attempt)
        if not published:
            shutil.rmtree(path, ignore_errors=True)
            return
        shutil.rmtree(path / INPUTS_DIR, ignore_errors=True)
        for other in layout.job_dir(self.data_dir, job_id).glob("attempt-*"):
            if other != path:
                shutil.rmtree(other, ignore_errors=True)

    def remove_job(self, job_id: str) -> None:
        """Everything of ``job_id`` (retention)."""
        shutil.rmtree(layout.job_dir(self.data_dir, job_id), ignore_errors=True)
