"""Every default of recalib in one place: settings, job options and the CLI read them from here.

Units are in the names (``_S`` seconds, ``_BYTES`` bytes). This module imports nothing.
"""

from __future__ import annotations

REDIS_URL = "redis://127.0.0.1:6379/0"
"""Where the API and ``recalib worker`` look for Redis when ``RECALIB_REDIS_URL`` is unset."""

DATA_DIR = "recalib-data"
"""Uploads, job artifacts and the embedded server's data (relative to the working directory)."""

QUEUE_NAME = "recalib"
"""RQ queue the API enqueues into and the workers listen to."""

SERVER_URL = "http://127.0.0.1:8000"
"""Where ``recalib submit`` and :class:`recalib.client.RecalibClient` find the API."""

HOST = "127.0.0.1"
PORT = 8000

MAX_UPLOAD_BYTES = 4 * 1024**3
"""Largest accepted upload."""

MAX_REQUEST_JSON_BYTES = 1024**2
"""Largest request body other than an upload (``POST /v1/jobs``), bytes."""

MAX_ARCH_KWARGS_BYTES = 64 * 1024
"""Largest ``arch_kwargs`` of a job, serialized as compact JSON."""

MAX_ARCH_KWARGS_DEPTH = 32
"""Deepest nesting of lists and objects in ``arch_kwargs``."""

UPLOAD_IDLE_TIMEOUT_S = 30.0
"""A request body that sends nothing for this long is refused (408) and its connection closed."""

HTTP_KEEPALIVE_S = 5
"""uvicorn ``timeout_keep_alive``: an idle keep-alive connection is closed after this."""

HTTP_MAX_HEADER_BYTES = 16 * 1024
"""Largest request headers (431 past it); also uvicorn's ``h11_max_incomplete_event_size``."""

HTTP_MAX_CONNECTIONS = 1000
"""uvicorn ``limit_concurrency``: connections past this are answered 503 at once."""

JOB_TIMEOUT_S = 3600
JOB_MAX_ATTEMPTS = 2
REAPER_INTERVAL_S = 5.0
WORKER_HEARTBEAT_S = 10
WORKER_DRAIN_TIMEOUT_S = 0
"""After a warm shutdown (SIGTERM) starts, how long a running job may go on before it is handed
back to the queue; 0: no deadline (it finishes, however long it takes)."""
RETENTION_S = 7 * 24 * 3600

WORKER_MODE = "warm"
"""``warm``: each worker runs jobs in one long-lived runner process (torch, the device and recent
models stay loaded); ``fork``: each job in a fresh process forked from the worker."""

RUNNER_MAX_JOBS = 200
"""A warm runner is replaced after this many jobs (Celery's max-tasks-per-child)."""

RUNNER_MAX_RSS_MB = 8192
"""A warm runner whose resident memory passed this after a job is replaced (0: never)."""

DATA_WORKERS = -1
"""DataLoader processes decoding image archives; -1: min(8, CPU cores - 1)."""

PRESIGNED_EXPIRY_S = 3600
"""Lifetime of presigned URLs of the object store (direct uploads and downloads)."""

DIRECT_UPLOAD_PART_BYTES = 64 * 1024**2
"""Part size of a direct (presigned multipart) upload; larger for files over 640 GiB."""

INPUT_CACHE_BYTES = 20 * 1024**3
"""Bytes of inputs fetched by URI that a worker keeps, by sha256."""

ARCH_ALLOWLIST = ("torchvision.models", "timm")
"""Module prefixes an ``arch`` (``module:callable``) may be imported from."""

MAX_ARCHIVE_MEMBERS = 100_000
MAX_ARCHIVE_BYTES = 8 * 1024**3
MAX_IMAGE_PIXELS = 50_000_000

WEBHOOK_RETRY_S = 3600
"""A webhook delivery is retried (backoff 1, 2, 4 … s) until this long after its event."""

WEBHOOK_MAX_BACKOFF_S = 300.0
"""Longest wait between two attempts of a webhook delivery."""

WEBHOOK_PROGRESS_INTERVAL_S = 10.0
"""At most one ``progress`` webhook per job per this many seconds (of the job's events)."""

WEBHOOK_CONNECT_TIMEOUT_S = 3.0
WEBHOOK_TIMEOUT_S = 10.0
"""One webhook attempt: connecting, then the whole attempt (the receiver's answer included)."""

WEBHOOK_POLL_S = 0.5
"""How often the API's webhook sender looks for new job events and due deliveries."""

WEBHOOK_PARALLEL = 8
"""Deliveries one sender pass attempts at once (a slow receiver holds one of them)."""

BATCH_SIZE = 64
"""Calibration batch size, samples."""

EVAL_BATCH_SIZE = 256
"""Evaluation batch size, samples."""

MOMENTUM = 0.1
"""EMA momentum (``estimator=ema`` only); BN's own default."""

TOLERANCE_WINDOW = 5
"""Batches over which ``tolerance`` is judged."""

HOLDOUT = 0.5

DRIFT_THRESHOLD = 0.05
"""Drift score (mean symmetric KL per BN channel, nats) above which a drift check recommends
recalibrating: measured on digits (``bench/drift.py``, README "Should we recalibrate?")."""

DRIFT_MIN_SAMPLES = 16
"""Below this many samples a drift score is mostly sampling noise (clean digits read up to 0.12
at 8 samples), and the drift report says so."""

DRIFT_TOP_LAYERS = 5
"""Layers named in a drift report's ``most_moved``."""
"""Fraction of labeled calibration data held out when no eval file is given."""

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
"""Devices a job or a worker may name: auto = CUDA if available, else CPU."""

ONNX_EXPORT_TOLERANCE = 1e-4
"""``options.export = ["onnx"]``: the exported ONNX model's outputs on an evaluation batch may
differ from the recalibrated torch model's by at most this × max(1, max |output|) (float32
kernels of two runtimes differ by ~1e-6 relative; a wrong export by far more)."""
