#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install recalib with the given extras; safe to run again.
#   bash scripts/setup.sh dev     # what scripts/test.sh uses
#   bash scripts/setup.sh demo    # what scripts/demo.sh uses
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "recalib needs Python >= 3.11 (found $("$python" --version 2>&1)); set PYTHON=..." >&2; exit 2; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (override with TORCH_SPEC).
# Even pinned, PyPI's torch for Linux is the CUDA build (several GB with its nvidia-* packages);
# TORCH_INDEX_URL installs it from another index instead, as PyTorch documents for the CPU build:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh dev
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
cpu_index=https://download.pytorch.org/whl/cpu
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q --index-url "$TORCH_INDEX_URL" "$torch_spec"
else
  # Quiet when torch is installed already or lies in a local wheel folder (pip's find-links):
  # then nothing is downloaded. Otherwise say what is coming and how to get the CPU build.
  if [ "$(uname -s)" = Linux ] && ! .venv/bin/python -m pip install -q --dry-run --no-deps \
    --no-index "$torch_spec" >/dev/null 2>&1; then
    echo "note: installing $torch_spec from PyPI: on Linux that is the CUDA build, several GB" \
      "with its nvidia-* packages. On a machine without an NVIDIA GPU, stop (Ctrl-C) and run" \
      "TORCH_INDEX_URL=$cpu_index bash scripts/setup.sh $extras for the CPU build." >&2
  fi
  .venv/bin/python -m pip install -q "$torch_spec"
fi
# recalib, service and worker are top-level packages side by side (no src/ folder), so setuptools
# makes the editable install with an import hook and says so in a notice ("Editable
# installation. Please be careful with folders in your working directory...") that pip
# repeats as a warning despite -q. Those folders are these very packages: only that notice is
# filtered out; every other warning of the build still shows.
PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
  .venv/bin/python -m pip install -q -e ".[${extras}]"
# The web page's browser test drives Debian's Chromium (tests/test_web_ui.py). Installed here when
# we may (root with apt-get); elsewhere that test says how to get it.
if [ "$extras" = dev ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: no chromium; tests/test_web_ui.py needs Debian's chromium and chromium-driver" >&2
  fi
fi
# The MLflow tests start a real `mlflow server` (tests/mlflow_server.py) from a tool environment of
# its own, so the full mlflow package (~850 MB, ~3 min to install) stays out of .venv.
if [ "$extras" = dev ] && [ ! -x .venv-mlflow/bin/mlflow ]; then
  "$python" -m venv .venv-mlflow
  .venv-mlflow/bin/python -m pip install -q "mlflow>=3.0,<4"
fi
