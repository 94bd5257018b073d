#!/usr/bin/env bash
# Build a minimal Debian base image for Jobdock's Dockerfile without any registry:
# debootstrap (minbase) + python3, python3-venv, ca-certificates, imported with
# `docker import`. Needs root on Debian (debootstrap is installed if missing).
#
#   scripts/build-base-image.sh            build jobdock-base:<suite> unless it exists
#   scripts/build-base-image.sh --force    rebuild the rootfs and re-import the tag
#
# Prints the image tag on stdout (everything else goes to stderr), so:
#   docker build --build-arg BASE_IMAGE="$(scripts/build-base-image.sh)" .
#
# The suite defaults to the host's Debian release (VERSION_CODENAME), so the image's
# python3 has the host's minor version and wheels built on the host install in it.
#
# Environment:
#   JOBDOCK_BASE_SUITE   Debian suite (default: the host's, else bookworm)
#   JOBDOCK_BASE_TAG     image tag (default: jobdock-base:<suite>)
#   JOBDOCK_CACHE_DIR    where the rootfs tarball and the .deb files are kept
#                        (default: .cache/ in the repository; it is gitignored)
#   DEBIAN_MIRROR        default: http://deb.debian.org/debian
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

host_suite() {
    # shellcheck disable=SC1091
    (. /etc/os-release 2>/dev/null && [[ "${ID:-}" == debian ]] && echo "${VERSION_CODENAME:-}")
}

suite="${JOBDOCK_BASE_SUITE:-$(host_suite || true)}"
suite="${suite:-bookworm}"
tag="${JOBDOCK_BASE_TAG:-jobdock-base:${suite}}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${JOBDOCK_CACHE_DIR:-$PWD/.cache}"
arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
tarball="$cache/base/jobdock-base-${suite}-${arch}.tar"
packages=python3,python3-venv,ca-certificates

log() { echo "build-base-image: $*" >&2; }

if [[ $force == 0 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    log "$tag exists (--force rebuilds it)"
    echo "$tag"
    exit 0
fi

start=$SECONDS
if [[ $force == 1 || ! -s "$tarball" ]]; then
    if [[ "$(id -u)" != 0 ]]; then
        log "debootstrap needs root; run this as root (or build with a registry instead)"
        exit 1
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap from Debian"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            debootstrap >/dev/null
    fi
    mkdir -p "$cache/base" "$cache/debs"
    rootfs="$(mktemp -d "$cache/base/rootfs.XXXXXX")"
    chmod 755 "$rootfs"  # it becomes the image's /
    cleanup() {
        # debootstrap mounts proc and sys in the target; never leave them behind.
        for mount in "$rootfs/proc" "$rootfs/sys" "$rootfs/dev/pts"; do
            if mountpoint -q "$mount" 2>/dev/null; then umount -l "$mount" || true; fi
        done
        rm -rf --one-file-system "$rootfs"
    }
    trap cleanup EXIT

    log "debootstrap --variant=minbase $suite ($arch) from $mirror (log: $cache/base/debootstrap.log)"
    if ! debootstrap --variant=minbase --arch="$arch" --include="$packages" \
            --cache-dir="$cache/debs" "$suite" "$rootfs" "$mirror" \
            >"$cache/base/debootstrap.log" 2>&1; then
        log "debootstrap failed; last lines of $cache/base/debootstrap.log:"
        tail -n 20 "$cache/base/debootstrap.log" >&2
        exit 1
    fi

    # Slim it down: no package lists, caches, manuals or host-specific files.
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf
    find "$rootfs"/usr/share/doc -mindepth 2 ! -name copyright -delete 2>/dev/null || true
    find "$rootfs"/usr/lib -name __pycache__ -prune -exec rm -rf {} +
    # The engine bind-mounts these at run time; leave empty files behind.
    : >"$rootfs/etc/hostname"
    : >"$rootfs/etc/resolv.conf"

    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    cleanup
    trap - EXIT
    log "rootfs cached in $tarball ($(du -h "$tarball" | cut -f1)) after $((SECONDS - start)) s"
else
    log "using the cached rootfs $tarball"
fi

docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian ${suite} minbase with python3 (debootstrap)\"" \
    --message "debootstrap --variant=minbase --include=$packages $suite" \
    "$tarball" "$tag" >/dev/null
log "imported $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - start)) s"
echo "$tag"
