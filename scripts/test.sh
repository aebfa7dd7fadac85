#!/usr/bin/env bash
# Command 2 of the README: set up, then run the whole test suite (real Valkey, real workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
# pytest's 5 means "no tests collected": a suite that ran nothing has failed.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$status"
