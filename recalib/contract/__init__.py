"""The contract between API, queue, worker and CLI: one set of pydantic models all of them import.

The same models serve the OpenAPI schema, the queue payload and ``report.json``. Split by role:
:mod:`~recalib.contract.options` (what a job does), :mod:`~recalib.contract.report` (what it
found), :mod:`~recalib.contract.api` (the REST resources). Inputs forbid extra fields and
non-finite numbers, so a misspelt option or a NaN fails loudly instead of being stored. Units are
in the names (``_s`` seconds, ``_bytes`` bytes); accuracies are fractions in [0, 1].

This package is torch-free: the API imports it.
"""

from recalib.contract.api import (
    FileId,
    FilePublic,
    FileRecord,
    JobCreate,
    JobError,
    JobEvent,
    JobId,
    JobPublic,
    JobRecord,
    JobStatus,
    Page,
    Phase,
    Problem,
    Progress,
    Readiness,
    WorkerInfo,
)
from recalib.contract.options import Estimator, JobOptions, JobSpec, Preprocess, Task
from recalib.contract.report import (
    REPORT_SCHEMA_VERSION,
    Artifact,
    CalibrationSummary,
    ConfidenceHistogram,
    DataSplit,
    Estimate,
    EstimatedTop1,
    FoldReport,
    InputSource,
    Interval,
    LayerChange,
    Metrics,
    OomRetry,
    OutputChange,
    Report,
    Runtime,
    SandboxUsed,
    Significance,
    SkippedLayer,
    TaskDecision,
    Verdict,
)

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "Artifact",
    "CalibrationSummary",
    "ConfidenceHistogram",
    "DataSplit",
    "Estimate",
    "EstimatedTop1",
    "Estimator",
    "FileId",
    "FilePublic",
    "FileRecord",
    "FoldReport",
    "InputSource",
    "Interval",
    "JobCreate",
    "JobError",
    "JobEvent",
    "JobId",
    "JobOptions",
    "JobPublic",
    "JobRecord",
    "JobSpec",
    "JobStatus",
    "LayerChange",
    "Metrics",
    "OomRetry",
    "OutputChange",
    "Page",
    "Phase",
    "Preprocess",
    "Problem",
    "Progress",
    "Readiness",
    "Report",
    "Runtime",
    "SandboxUsed",
    "Significance",
    "SkippedLayer",
    "Task",
    "TaskDecision",
    "Verdict",
    "WorkerInfo",
]
