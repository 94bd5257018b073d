#!/usr/bin/env bash
# Make sure a Docker engine answers; on Debian as root, install and start one.
#
#   scripts/ensure-engine.sh          the engine only (what `make run` needs)
#   scripts/ensure-engine.sh --test   also Debian's busybox-static (the test image)
#
# The engine is started as `dockerd --bridge=none --iptables=false --ip-masq=false`: job
# containers get loopback only, never an address on a bridge.
set -euo pipefail

want_test_deps=0
[[ "${1:-}" == "--test" ]] && want_test_deps=1

socket="${DOCKER_HOST:-unix:///var/run/docker.sock}"
socket="${socket#unix://}"
log=/var/log/jobdock-dockerd.log

engine_answers() {
    python3 - "$socket" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
try:
    s.connect(sys.argv[1])
    s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    sys.exit(0 if b" 200 " in s.recv(64) else 1)
except OSError:
    sys.exit(1)
PY
}

is_debian_root() {
    [[ "$(id -u)" == 0 && -x /usr/bin/apt-get && -f /etc/debian_version ]]
}

apt_install() {
    if [[ ! -f /var/lib/apt/periodic/jobdock-updated ]]; then
        apt-get update -qq
        mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/jobdock-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
if [[ $want_test_deps == 1 ]] && ! grep -qs "static" <(file -b /bin/busybox 2>/dev/null) \
        && ! dpkg -s busybox-static >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
if ! engine_answers && ! command -v dockerd >/dev/null; then
    missing+=(docker.io)
fi
if (( ${#missing[@]} )); then
    if is_debian_root; then
        echo "installing ${missing[*]} from Debian" >&2
        apt_install "${missing[@]}"
    else
        echo "missing: ${missing[*]}. Install them (Debian: apt-get install ${missing[*]})," >&2
        echo "or run this script as root on Debian to have it done for you." >&2
        exit 1
    fi
fi

if engine_answers; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "no Docker engine answers on $socket, and only root can start one here." >&2
    echo "start it with: sudo dockerd --bridge=none --iptables=false --ip-masq=false" >&2
    exit 1
fi
if [[ "$socket" != /var/run/docker.sock ]]; then
    echo "no Docker engine answers on $socket (DOCKER_HOST); start it there" >&2
    exit 1
fi

echo "starting dockerd (log: $log)" >&2
setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false >>"$log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
    if engine_answers; then
        echo "Docker engine is up" >&2
        exit 0
    fi
    sleep 0.5
done
echo "dockerd did not come up within 60 s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
