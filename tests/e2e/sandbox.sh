#!/usr/bin/env bash
# Build (once) the real-parts sandbox the e2e tests run against.
#
# Usage:
#   bash tests/e2e/sandbox.sh asterisk   # Debian sid chroot with Asterisk 22 (asterisk, asterisk-modules)
#   bash tests/e2e/sandbox.sh n8n        # not yet: n8n inside the same chroot (see sandbox_n8n below)
#   bash tests/e2e/sandbox.sh path       # print the chroot path
#
# Environment:
#   VOXBRIDGE_SANDBOX_DIR  cache directory (default: $HOME/.cache/voxbridge); the chroot is <dir>/sid
#   DEBIAN_MIRROR          Debian mirror for debootstrap
#
# Why a chroot: Debian 12 ships no Asterisk package, and installing sid packages on the host would
# upgrade libc and hundreds of packages. The chroot shares the host's network namespace, so AMI and
# AudioSocket on 127.0.0.1 work between host and chroot without any setup.
#
# Idempotent: the root is built into a temporary directory and renamed into place only after it is
# complete, then a stamp file is written. A second run sees the stamp and returns immediately.
set -euo pipefail

DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SANDBOX_DIR="${VOXBRIDGE_SANDBOX_DIR:-$HOME/.cache/voxbridge}"
ROOT="$SANDBOX_DIR/sid"
ASTERISK_STAMP="$ROOT/.voxbridge-asterisk.stamp"
ASTERISK_PACKAGES="asterisk,asterisk-modules"

log() { printf '[sandbox] %s\n' "$*" >&2; }
die() { printf '[sandbox] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ensure_debootstrap() {
    if command -v debootstrap >/dev/null 2>&1; then
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "debootstrap is not installed and we are not root: install it (apt-get install debootstrap) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and there is no apt-get to install it"
    log "installing debootstrap with apt-get"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap || die "could not install debootstrap"
}

sandbox_asterisk() {
    if [ -f "$ASTERISK_STAMP" ] && [ -x "$ROOT/usr/sbin/asterisk" ]; then
        log "asterisk chroot ready: $ROOT ($(cat "$ASTERISK_STAMP"))"
        echo "$ROOT"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "building the chroot needs root (debootstrap and chroot); run as root or build $ROOT elsewhere and set VOXBRIDGE_SANDBOX_DIR"
    if [ -e "$ROOT" ]; then
        die "$ROOT exists but has no completion stamp: remove it (umount $ROOT/proc first if mounted) and re-run"
    fi
    ensure_debootstrap
    mkdir -p "$SANDBOX_DIR"

    local tmp
    tmp="$(mktemp -d "$SANDBOX_DIR/.sid-build.XXXXXX")"
    # Clean a failed build (never a finished one: it has been renamed away by then).
    # shellcheck disable=SC2064
    trap "cleanup_build '$tmp'" EXIT

    local started=$SECONDS
    log "debootstrap --variant=minbase --include=$ASTERISK_PACKAGES sid -> $tmp (about a minute, ~500 MB)"
    if ! debootstrap --variant=minbase --include="$ASTERISK_PACKAGES" sid "$tmp" "$DEBIAN_MIRROR" \
        >"$SANDBOX_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$SANDBOX_DIR/debootstrap.log" >&2 || true
        die "debootstrap failed (full log: $SANDBOX_DIR/debootstrap.log)"
    fi
    [ -x "$tmp/usr/sbin/asterisk" ] || die "debootstrap finished but $tmp/usr/sbin/asterisk is missing"
    [ -f "$tmp/usr/lib/x86_64-linux-gnu/asterisk/modules/app_audiosocket.so" ] \
        || die "asterisk-modules has no app_audiosocket.so"

    # Never let a package's service start inside the chroot if something is installed later.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod +x "$tmp/usr/sbin/policy-rc.d"
    # CA bundle, for HTTPS from inside the chroot (npm for the n8n step).
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$tmp/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$tmp/etc/ssl/certs/ca-certificates.crt"
    fi

    local version
    version="$(chroot "$tmp" /usr/sbin/asterisk -V 2>/dev/null || echo unknown)"
    # The stamp goes in before the rename, so the root appears complete or not at all.
    echo "$version built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - started))s" \
        >"$tmp/$(basename "$ASTERISK_STAMP")"
    mv -T "$tmp" "$ROOT"
    trap - EXIT
    log "asterisk chroot built: $ROOT ($(cat "$ASTERISK_STAMP"))"
    echo "$ROOT"
}

cleanup_build() {
    local tmp="$1"
    [ -n "$tmp" ] && [ -d "$tmp" ] || return 0
    log "removing incomplete build $tmp"
    # debootstrap may leave proc/sys mounted on failure.
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$tmp/$m" 2>/dev/null; then umount -l "$tmp/$m" || true; fi
    done
    rm -rf --one-file-system "$tmp"
}

# ---------------------------------------------------------------------------------------------
# n8n: NOT YET IMPLEMENTED. Another engineer adds n8n to the same chroot here.
# The verified recipe is in the project's reference notes (real-parts.md, "n8n"): nodejs/npm and
# native-addon headers from sid inside this chroot, n8n 1.123.x with an xlsx override, native
# modules (isolated-vm, sqlite3) rebuilt by hand with node-gyp. Use its own stamp file, e.g.
# "$ROOT/.voxbridge-n8n.stamp", and build on top of sandbox_asterisk's root.
# ---------------------------------------------------------------------------------------------
sandbox_n8n() {
    die "the n8n sandbox is not yet implemented (tests/e2e/sandbox.sh: sandbox_n8n)"
}

main() {
    [ $# -ge 1 ] || usage
    case "$1" in
        asterisk) sandbox_asterisk ;;
        n8n) sandbox_asterisk >/dev/null && sandbox_n8n ;;
        path) echo "$ROOT" ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"
