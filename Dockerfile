# syntax=docker/dockerfile:1
# Two images from one file:
#   api    — FastAPI service, no torch (small, fast start):  docker build --target api .
#   worker — queue worker with torch (CUDA build by default):  docker build --target worker .
# CPU-only worker: --build-arg TORCH_SPEC=torch==2.13.0+cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# Dependencies first (they change rarely), keyed only on pyproject.toml: a code change does not
# reinstall them. The shared requirements, then each image's extra (api: FastAPI; worker: torch
# and the onnx extra, ONNX Runtime).
FROM base AS core-deps
WORKDIR /build
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt

FROM core-deps AS api-deps
RUN python3 -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['optional-dependencies']['api']))" > api-requirements.txt \
    && pip install -r api-requirements.txt

FROM core-deps AS worker-deps
ARG TORCH_SPEC=torch==2.13.0
# +cpu builds live on PyTorch's own index, not on PyPI: with TORCH_SPEC=torch==X+cpu pass
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (compose's CPU profile does).
ARG TORCH_INDEX_URL=""
# TORCH_SPEC is a pinned requirement (torch==X or torch==X+cpu); hadolint cannot see through the ARG.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
    && python3 -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); deps = d['project']['optional-dependencies']; print('\n'.join(x for x in deps['worker'] + deps['onnx'] if not x.startswith('torch')))" > worker-requirements.txt \
    && pip install -r worker-requirements.txt

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 recalib \
    && useradd --system --uid 10001 --gid recalib --home-dir /data --shell /usr/sbin/nologin recalib \
    && mkdir -p /data && chown recalib:recalib /data
ENV RECALIB_DATA_DIR=/data
VOLUME ["/data"]
WORKDIR /app

# The API enqueues work by dotted path and never imports worker/: the image has neither torch nor
# the worker package (the build fails if importing the app pulls torch in).
FROM runtime AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY pyproject.toml README.md ./
COPY recalib ./recalib
COPY service ./service
RUN pip install --no-deps . \
    && python3 -c "import sys, service.main; sys.exit('torch imported' if 'torch' in sys.modules else 0)" \
    && recalib serve --help >/dev/null
USER 10001:10001
# service.server runs uvicorn with the RECALIB_HTTP_* limits; it reads UVICORN_HOST/UVICORN_PORT
# as the uvicorn command does, and the healthcheck follows the same port.
ENV UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['UVICORN_PORT']}/healthz\", timeout=4)"]
CMD ["python3", "-m", "service.server"]

# The worker imports the job layer, never service/: the image has neither FastAPI nor service/
# (the build fails if either is there, or if the CLI does not start without them).
FROM runtime AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY pyproject.toml README.md ./
COPY recalib ./recalib
COPY worker ./worker
RUN pip install --no-deps . \
    && python3 -c "import importlib.util as u, sys, torch, worker.runner.process; sys.exit([m for m in ('fastapi', 'uvicorn', 'service') if u.find_spec(m)] or 0)" \
    && recalib worker --help >/dev/null
USER 10001:10001
CMD ["recalib", "worker"]
