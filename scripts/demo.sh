#!/usr/bin/env bash
# Command 1 of the README: set up, then run the digits domain-shift demo end to end through the
# REST API (embedded Valkey + API + one worker, all stopped at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/recalib demo "$@"
