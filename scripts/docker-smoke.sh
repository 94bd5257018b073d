#!/usr/bin/env bash
# Smoke test of Jobdock's Docker image, with no registry: build a Debian base image with
# debootstrap (scripts/build-base-image.sh), the Python wheels on the host, Jobdock's image
# on that base offline; run it with the host's Docker socket and check that
#   - its HEALTHCHECK turns healthy, and the service runs as a non-root user;
#   - a job submitted through it (`jobdock submit --wait` inside the container, so no
#     port is published and the container needs no network: it runs with --network none)
#     succeeds with the output "hi";
#   - the job containers it starts on the host's engine still get NetworkMode none.
# The container (and any job container it left) is removed on exit.
#
#   scripts/docker-smoke.sh              (as root on Debian, like .ci/run; `make docker-smoke`)
#
# Environment:
#   JOBDOCK_IMAGE       tag of the image built (default jobdock:smoke)
#   JOBDOCK_CACHE_DIR   rootfs and .deb cache (default .cache/, gitignored); the wheels
#                       are always in .cache/wheelhouse, in the build context
#   PYTHON              the python whose pip builds the wheels (default .venv/bin/python);
#                       the .venv's versions pin the image's (pip freeze as constraints)
set -euo pipefail
cd "$(dirname "$0")/.."

image="${JOBDOCK_IMAGE:-jobdock:smoke}"
cache="${JOBDOCK_CACHE_DIR:-$PWD/.cache}"
export JOBDOCK_CACHE_DIR="$cache"
# In the build context, where the Dockerfile looks for it (whatever JOBDOCK_CACHE_DIR is).
wheelhouse="$PWD/.cache/wheelhouse"
job_image=jobdock-test-busybox
socket=/var/run/docker.sock
name="jobdock-smoke-$$"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

started=$SECONDS
step_started=$SECONDS
step() {
    echo "docker-smoke: [$((SECONDS - started)) s] $*" >&2
    step_started=$SECONDS
}
done_step() { echo "docker-smoke:   ... $((SECONDS - step_started)) s" >&2; }
fail() {
    echo "docker-smoke: FAILED: $*" >&2
    exit 1
}

job_ids=()
cleanup() {
    if docker container inspect "$name" >/dev/null 2>&1; then
        if [[ "${ok:-0}" == 0 ]]; then
            echo "docker-smoke: last lines of the service's log:" >&2
            docker logs --tail 15 "$name" 2>&1 | sed 's/^/    /' >&2 || true
        fi
        # SIGTERM first: the worker pool stops its job containers on a graceful stop.
        docker stop -t 20 "$name" >/dev/null 2>&1 || true
        docker rm -f -v "$name" >/dev/null 2>&1 || true
    fi
    local id leftover
    for id in "${job_ids[@]}"; do
        leftover="$(docker ps -aq --filter "label=jobdock.job-id=$id")"
        if [[ -n "$leftover" ]]; then
            # shellcheck disable=SC2086
            docker rm -f $leftover >/dev/null 2>&1 || true
        fi
    done
}
trap cleanup EXIT

# Inside the service's container, as its own user: the image's CLI against its own API.
in_service() { docker exec -e JOBDOCK_URL=http://127.0.0.1:8000 "$name" "$@"; }

job_field() {  # job_field FIELD < job JSON
    python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]))' "$1"
}

step "engine and the test image ($job_image)"
scripts/ensure-engine.sh --test
if ! docker image inspect "$job_image" >/dev/null 2>&1; then
    make --no-print-directory test-image
fi
done_step

step "base image (debootstrap; cached in $cache/base)"
base="$(scripts/build-base-image.sh)"
done_step

step "wheelhouse for the image's python ($wheelhouse)"
want_python="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
base_python="$(docker run --rm --network none "$base" python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$want_python" != "$base_python" ]]; then
    fail "$base has python $base_python but $python is $want_python: the wheels would not fit"
fi
mkdir -p "$cache" "$wheelhouse"
deps="$("$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')"
# Pin what the .venv (the tested environment) has; pip, setuptools and wheel are the
# image's own build tools (jobdock's build backend wants setuptools>=69).
"$python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -viE '^(pip|setuptools|wheel|jobdock)([=@ ]|$)' >"$cache/constraints.txt" || true
stamp="$( { echo "$want_python"; echo "$deps"; cat "$cache/constraints.txt"; } | sha256sum | cut -c1-16)"
if [[ "$(cat "$wheelhouse/.stamp" 2>/dev/null || true)" == "$stamp" ]]; then
    echo "docker-smoke:   unchanged since the last build ($(find "$wheelhouse" -name '*.whl' | wc -l) wheels)" >&2
else
    rm -rf "$wheelhouse"
    mkdir -p "$wheelhouse"
    # shellcheck disable=SC2086  # one requirement per word; none contains a blank
    "$python" -m pip wheel -q --disable-pip-version-check -w "$wheelhouse" \
        -c "$cache/constraints.txt" $deps 'setuptools>=69' wheel \
        >"$cache/wheelhouse.log" 2>&1 \
        || { tail -n 20 "$cache/wheelhouse.log" >&2; fail "pip wheel (log: $cache/wheelhouse.log)"; }
    echo "$stamp" >"$wheelhouse/.stamp"
fi
done_step

step "docker build -t $image --build-arg BASE_IMAGE=$base (offline, from the wheelhouse)"
previous="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
docker build -q -t "$image" --build-arg BASE_IMAGE="$base" . >/dev/null
if [[ -n "$previous" && "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]]; then
    docker rmi "$previous" >/dev/null 2>&1 || true  # this script's own earlier build
fi
size="$(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
echo "docker-smoke:   $image is $size" >&2
[[ -n "$(docker image inspect -f '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}' "$image")" ]] \
    || fail "$image declares no HEALTHCHECK"
done_step

step "run it with the host's Docker socket (--network none, nothing published)"
# Hardened as docker-compose.yml runs it: read-only root, no capabilities; /data is a volume.
docker run -d --name "$name" --network none \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -v "$socket:$socket" --group-add "$(stat -c %g "$socket")" \
    --health-interval 2s --health-start-period 60s \
    "$image" >/dev/null
health=starting
for _ in $(seq 1 60); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$name")"
    [[ "$health" == healthy ]] && break
    [[ "$(docker inspect -f '{{.State.Running}}' "$name")" == true ]] || fail "the service exited"
    sleep 1
done
[[ "$health" == healthy ]] || fail "health is $health after 60 s"
echo "docker-smoke:   health: $health" >&2
uid="$(in_service python3 -c 'import os; print(os.stat("/proc/1").st_uid, os.getuid())')"
[[ "$uid" != 0* && "$uid" != *" 0" ]] || fail "the service runs as root (uids: $uid)"
echo "docker-smoke:   the service (pid 1) and exec run as uid $uid" >&2
done_step

step "submit a job through it: jobdock submit --wait $job_image -- echo hi"
rc=0
out="$(in_service jobdock submit --wait "$job_image" -- echo hi 2>"$cache/submit.err")" || rc=$?
err="$(cat "$cache/submit.err")"
id="$(sed -n 's/^jobdock: job \([0-9a-f-]*\).*/\1/p' <<<"$err" | head -n 1)"
[[ -n "$id" ]] && job_ids+=("$id")
[[ $rc == 0 ]] || fail "submit --wait exited $rc: $err"
[[ "$out" == hi ]] || fail "the job printed '$out', not 'hi'"
state="$(in_service jobdock get "$id" | job_field state)"
[[ "$state" == succeeded ]] || fail "job $id is $state"
echo "docker-smoke:   job $id: $state, output '$out'" >&2
done_step

step "the image serves the dashboard (/ui/, its files ship in the package) and /metrics"
fetch() {  # fetch PATH: the body of http://127.0.0.1:8000/PATH, from inside the container
    in_service python3 -c 'import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:8000" + sys.argv[1], timeout=10).read().decode())' "$1"
}
fetch /ui/ | grep -q '<title>Jobdock' || fail "/ui/ does not serve the dashboard"
fetch /ui/static/app.js | grep -q 'sessionStorage' || fail "/ui/static/app.js is not the dashboard's script"
fetch /metrics | grep -q '^jobdock_jobs_finished_total{state="succeeded"} 1.0$' \
    || fail "/metrics does not count the job that succeeded"
echo "docker-smoke:   /ui/, /ui/static/app.js and /metrics answer" >&2
done_step

step "the job containers it starts on the host's engine get NetworkMode none"
id="$(in_service jobdock submit --timeout 120 "$job_image" -- sleep 60)"
job_ids+=("$id")
container=""
for _ in $(seq 1 60); do
    container="$(docker ps -q --filter "label=jobdock.job-id=$id" | head -n 1)"
    [[ -n "$container" ]] && break
    sleep 0.5
done
[[ -n "$container" ]] || fail "no running container of job $id after 30 s"
mode="$(docker inspect -f '{{.HostConfig.NetworkMode}}' "$container")"
[[ "$mode" == none ]] || fail "job container $container has NetworkMode $mode"
echo "docker-smoke:   job $id runs in $container with NetworkMode $mode" >&2
in_service jobdock cancel "$id" >/dev/null
state="$(in_service jobdock get --wait 30 "$id" | job_field state)"
[[ "$state" == cancelled ]] || fail "job $id is $state after cancel"
done_step

ok=1
echo "docker-smoke: OK in $((SECONDS - started)) s ($image, $size, base $base)" >&2
