#!/usr/bin/env bash
# Fuzz the HTTP API with schemathesis: start `jobdock serve` on a free loopback port with a
# fresh database and no workers (no fuzzed job ever runs), test every operation of its live
# /openapi.json, stop it. Exits non-zero on any 5xx, schema violation or other failure.
#
#   scripts/fuzz-api.sh [extra schemathesis options]
#
# Environment: FUZZ_MAX_EXAMPLES (50 per operation), FUZZ_WORKERS (2), FUZZ_SEED (random),
# JOBDOCK_DATABASE_URL (default: a fresh SQLite file; point it at an empty PostgreSQL
# database to fuzz that instead), VENV (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="$(cd "${VENV:-.venv}/bin" && pwd)"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-50}"
WORKERS="${FUZZ_WORKERS:-2}"
WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/jobdock-fuzz.XXXXXX")"
PORT="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
SERVER_PID=""

cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORKDIR"
}
trap cleanup EXIT

export JOBDOCK_DATABASE_URL="${JOBDOCK_DATABASE_URL:-sqlite+aiosqlite:///$WORKDIR/jobdock.db}"
export JOBDOCK_WORKERS=0
# A fuzzed `?wait=` must not hold a request for a minute: no job ever finishes here.
export JOBDOCK_WAIT_MAX_SECONDS=1
export JOBDOCK_POLL_INTERVAL_SECONDS=0.5

# With API keys (`jobdock keys`), fuzz as an admin key; without them, unauthenticated.
AUTH=()
if "$BIN/jobdock" keys --help >/dev/null 2>&1; then
    KEY="$("$BIN/jobdock" keys create fuzz --admin 2>/dev/null | head -n 1 || true)"
    if [[ -z "$KEY" ]]; then
        KEY="$("$BIN/jobdock" keys create fuzz-plain 2>/dev/null | head -n 1)"
    fi
    AUTH=(-H "Authorization: Bearer $KEY")
    echo "fuzz-api: using an API key"
else
    echo "fuzz-api: no \`jobdock keys\`; fuzzing without authentication"
fi

"$BIN/jobdock" serve --host 127.0.0.1 --port "$PORT" --workers 0 --log-level warning \
    >"$WORKDIR/service.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    if curl -fsS "$URL/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "fuzz-api: jobdock exited at start:" >&2
        cat "$WORKDIR/service.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "$URL/healthz" >/dev/null
# Fuzzing with a key the service refuses would only ever meet 401s: make sure it is taken.
if [[ ${#AUTH[@]} -gt 0 ]] && ! curl -fsS "${AUTH[@]}" "$URL/jobs?limit=1" >/dev/null; then
    echo "fuzz-api: the service refuses the API key made for fuzzing" >&2
    exit 1
fi

# Checks: all, but `positive_data_acceptance`: the spec cannot say everything a valid job
# is (a Docker image reference's grammar, label keys, the operator's caps), so some
# schema-valid bodies are rightly refused with 422. Every refusal must still be a
# documented 4xx, which the other checks verify.
# Follow streams (`follow=true`) are pinned off: with no workers a queued job never ends,
# so its stream would only stop at the request timeout; tests/api/test_logs.py covers them.
cat >"$WORKDIR/schemathesis.toml" <<'TOML'
[[operations]]
include-operation-id = "get_job_logs"
parameters = { "query.follow" = false }
TOML

SEED=()
if [[ -n "${FUZZ_SEED:-}" ]]; then SEED=(--seed "$FUZZ_SEED"); fi

status=0
# From the temporary directory: schemathesis keeps a cache (.schemathesis/) where it runs.
(cd "$WORKDIR" && "$BIN/schemathesis" --no-color --config-file "$WORKDIR/schemathesis.toml" run "$URL/openapi.json" \
    --checks all \
    --exclude-checks positive_data_acceptance \
    --max-examples "$MAX_EXAMPLES" \
    --workers "$WORKERS" \
    --request-timeout 10 \
    --suppress-health-check too_slow,filter_too_much \
    --report-dir "$WORKDIR/report" \
    "${AUTH[@]}" "${SEED[@]}" "$@") || status=$?

if grep -q "Traceback" "$WORKDIR/service.log"; then
    echo "fuzz-api: the service logged an exception:" >&2
    cat "$WORKDIR/service.log" >&2
    status=1
fi
exit "$status"
