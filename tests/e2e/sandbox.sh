#!/usr/bin/env bash
# Build (once) the real-parts sandbox the e2e tests run against.
#
# Usage:
#   bash tests/e2e/sandbox.sh asterisk   # Debian sid chroot with Asterisk 22 (asterisk, asterisk-modules)
#   bash tests/e2e/sandbox.sh n8n        # + n8n 1.123 (Node 24) in the same chroot, and the n8n/ node package built
#   bash tests/e2e/sandbox.sh path       # print the chroot path
#
# Environment:
#   VOXBRIDGE_SANDBOX_DIR  cache directory (default: $HOME/.cache/voxbridge); the chroot is <dir>/sid
#   DEBIAN_MIRROR          Debian mirror for debootstrap (default: the host's own Debian mirror, read
#                          from its apt sources, so the chroot comes from wherever this machine's
#                          packages come from)
#
# Why a chroot: Debian 12 ships no Asterisk package, and installing sid packages on the host would
# upgrade libc and hundreds of packages. The chroot shares the host's network namespace, so AMI and
# AudioSocket on 127.0.0.1 work between host and chroot without any setup.
#
# Idempotent: the root is built into a temporary directory and renamed into place only after it is
# complete, then a stamp file is written. A second run sees the stamp and returns immediately.
set -euo pipefail

# The host's Debian archive: the first URI of a deb822 .sources entry (or a one-line sources.list
# entry) whose path ends in /debian — not the -security archive, not third-party repositories.
host_debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f"
    done | head -n 1 | grep . && return 0
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) { print $i; exit } }' \
        | head -n 1 | grep .
}
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(host_debian_mirror || true)}"
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
    [ -n "$DEBIAN_MIRROR" ] || die "no Debian mirror found in this machine's apt sources (/etc/apt/sources.list*): set DEBIAN_MIRROR"
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
# n8n, in the same chroot (the verified recipe of the reference notes, real-parts.md "n8n"):
#   * n8n 2.x cannot be installed from the registries here, and n8n 1.123.x does not run on the
#     host's Node 20 (its expression engine needs isolated-vm 6, which needs Node >= 22 headers), so
#     n8n runs on sid's Node 24 inside the chroot, installed with sid's nodejs/npm/node-gyp;
#   * n8n's `xlsx` dependency points at a tarball outside the registries: an override pins the
#     registry's xlsx 0.18.5, so nothing is downloaded from anywhere else;
#   * install scripts are not run (newer npm blocks them by default anyway): the two native addons
#     n8n needs, isolated-vm and sqlite3, are built by hand with Debian's node-gyp against
#     libnode-dev (isolated-vm needs `-include cstdint` with gcc 15).
# n8n lives inside the chroot tree at $N8N_CHROOT_DIR (host: $N8N_DIR), cached with the chroot;
# it is built in a temporary directory and renamed into place, then $N8N_STAMP is written.
#
# The node package (n8n/ in the repo) is built with the HOST's Node.js (20, the machine's own
# toolchain), not the chroot's: lint, jest and the TypeScript build are developer tools that must
# work on any developer's or CI's machine without root or the chroot, and the output (CommonJS,
# ES2019 target) does not depend on the Node version that builds it; the e2e test proves that
# n8n on Node 24 loads it. It is rebuilt when its sources change (a hash in dist/.build-hash).
# ---------------------------------------------------------------------------------------------
N8N_VERSION="${VOXBRIDGE_N8N_VERSION:-1.123.81}"
N8N_XLSX_VERSION="0.18.5"
N8N_CHROOT_DIR="/opt/voxbridge-n8n"
N8N_DIR="$ROOT$N8N_CHROOT_DIR"
N8N_STAMP="$ROOT/.voxbridge-n8n.stamp"
N8N_CA_BUNDLE="/etc/ssl/certs/voxbridge-host-ca-bundle.crt"   # inside the chroot
N8N_APT_PACKAGES="nodejs npm node-gyp libnode-dev python3 make g++ zlib1g-dev libllhttp-dev
    libada-url-dev libsimdjson-dev libsimdutf-dev libbrotli-dev libc-ares-dev libgtest-dev
    libhdr-histogram-dev libnghttp2-dev libnghttp3-dev libngtcp2-dev libsqlite3-dev libzstd-dev
    libicu-dev libuv1-dev libssl-dev ca-certificates"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NODE_PKG_DIR="$REPO_DIR/n8n"

# Run a command inside the chroot with a clean environment.
in_chroot() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        NODE_EXTRA_CA_CERTS="$N8N_CA_BUNDLE" npm_config_cafile="$N8N_CA_BUNDLE" \
        npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false \
        "$@"
}

n8n_ready() {
    [ -f "$N8N_STAMP" ] && grep -q "^n8n $N8N_VERSION " "$N8N_STAMP" \
        && [ -f "$N8N_DIR/node_modules/n8n/bin/n8n" ]
}

sandbox_n8n() {
    if n8n_ready; then
        log "n8n ready: $N8N_DIR ($(cat "$N8N_STAMP"))"
    else
        [ "$(id -u)" -eq 0 ] || die "installing n8n into the chroot needs root (chroot, apt-get)"
        install_n8n
    fi
    build_node_package
    echo "$N8N_DIR"
}

install_n8n() {
    local started=$SECONDS mounted_proc=""
    if ! mountpoint -q "$ROOT/proc"; then
        mount -t proc proc "$ROOT/proc" || die "cannot mount proc at $ROOT/proc"
        mounted_proc=1
    fi
    # The host's CA bundle, for npm's HTTPS inside the chroot, under its own name: the chroot's
    # ca-certificates package regenerates ca-certificates.crt (without the host's local CAs).
    mkdir -p "$ROOT/etc/ssl/certs"
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        cp /etc/ssl/certs/ca-certificates.crt "$ROOT$N8N_CA_BUNDLE"
    elif [ -f "$ROOT/etc/ssl/certs/ca-certificates.crt" ]; then
        cp "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT$N8N_CA_BUNDLE"
    fi
    [ -s "$ROOT/etc/resolv.conf" ] || cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

    local applog="$SANDBOX_DIR/n8n-apt.log" npmlog="$SANDBOX_DIR/n8n-npm.log" gyplog="$SANDBOX_DIR/n8n-gyp.log"
    log "apt-get install (in the chroot): nodejs npm node-gyp and native-addon headers (log: $applog)"
    # The sid snapshot served can be older than its Release file's Valid-Until.
    # shellcheck disable=SC2086
    if ! { in_chroot apt-get -o Acquire::Check-Valid-Until=false update \
        && in_chroot apt-get -o Acquire::Check-Valid-Until=false install -y --no-install-recommends \
            $N8N_APT_PACKAGES; } >"$applog" 2>&1; then
        tail -n 30 "$applog" >&2 || true
        [ -n "$mounted_proc" ] && umount -l "$ROOT/proc"
        die "apt-get in the chroot failed (full log: $applog)"
    fi
    log "node $(in_chroot node --version), npm $(in_chroot npm --version) in the chroot"

    local tmpname tmp
    tmpname="$(basename "$(mktemp -u "$ROOT/opt/.voxbridge-n8n-build.XXXXXX")")"
    tmp="$ROOT/opt/$tmpname"
    mkdir -p "$tmp"
    # shellcheck disable=SC2064
    trap "rm -rf --one-file-system '$tmp'; [ -n '$mounted_proc' ] && umount -l '$ROOT/proc'" EXIT
    cat >"$tmp/package.json" <<JSON
{
  "name": "voxbridge-n8n-sandbox",
  "private": true,
  "description": "n8n for voxbridge's e2e tests (built by tests/e2e/sandbox.sh n8n)",
  "dependencies": { "n8n": "$N8N_VERSION" },
  "overrides": { "xlsx": "$N8N_XLSX_VERSION" }
}
JSON
    log "npm install n8n@$N8N_VERSION in the chroot (cold: a few minutes, ~1.9k packages; log: $npmlog)"
    if ! in_chroot sh -c "cd /opt/$tmpname && npm install --ignore-scripts --no-audit --no-fund --loglevel=warn" \
        >"$npmlog" 2>&1; then
        tail -n 40 "$npmlog" >&2 || true
        die "npm install n8n@$N8N_VERSION failed (full log: $npmlog)"
    fi
    # The override must have won: xlsx from the registry, not n8n's tarball from elsewhere.
    if ! grep -q "\"version\": \"$N8N_XLSX_VERSION\"" "$tmp/node_modules/xlsx/package.json" 2>/dev/null \
        || grep -q '"resolved": "https\?://cdn' "$tmp/package-lock.json"; then
        die "xlsx is not the registry's $N8N_XLSX_VERSION (is the override in place?)"
    fi

    : >"$gyplog"
    local mod dir dirs flags
    for mod in isolated-vm sqlite3; do
        # Every copy npm placed (hoisted or nested), each built for this Node.
        dirs="$(cd "$tmp" && find . -type d -path "*/node_modules/$mod" -prune | sed 's#^\./##' | sort)"
        [ -n "$dirs" ] || die "n8n's dependency $mod is not in node_modules"
        flags=""
        [ "$mod" = isolated-vm ] && flags="CXXFLAGS='-include cstdint'"
        for dir in $dirs; do
            log "building $mod $(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$tmp/$dir/package.json" | head -n 1) with Debian's node-gyp ($dir)"
            if ! in_chroot sh -c "cd /opt/$tmpname/$dir && $flags /usr/bin/node-gyp rebuild --release" >>"$gyplog" 2>&1; then
                tail -n 40 "$gyplog" >&2 || true
                die "building $mod in $dir failed (full log: $gyplog)"
            fi
        done
    done
    # The addons must load, and n8n must answer --version, before the install counts as done.
    if ! in_chroot sh -c "cd /opt/$tmpname/node_modules/n8n && node -e \"require('isolated-vm'); require('sqlite3')\"" \
        >>"$gyplog" 2>&1; then
        tail -n 20 "$gyplog" >&2 || true
        die "isolated-vm or sqlite3 does not load after the build (log: $gyplog)"
    fi
    local version
    version="$(in_chroot sh -c "cd /opt/$tmpname && HOME=/tmp node node_modules/n8n/bin/n8n --version" 2>>"$gyplog" | tail -n 1)"
    [ "$version" = "$N8N_VERSION" ] || die "n8n --version printed '$version', expected $N8N_VERSION (log: $gyplog)"

    rm -rf --one-file-system "$N8N_DIR"
    mv -T "$tmp" "$N8N_DIR"
    trap - EXIT
    [ -n "$mounted_proc" ] && umount -l "$ROOT/proc"
    echo "n8n $N8N_VERSION node $(in_chroot node --version) installed $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - started))s" \
        >"$N8N_STAMP"
    log "n8n installed: $N8N_DIR ($(cat "$N8N_STAMP"))"
}

# Build the community node package with the host's Node.js (see the comment above).
build_node_package() {
    [ -f "$NODE_PKG_DIR/package.json" ] || die "$NODE_PKG_DIR/package.json is missing"
    command -v npm >/dev/null 2>&1 || die "the host has no npm: the node package is built with the host's Node.js (>= 20)"
    local hash
    hash="$(cd "$NODE_PKG_DIR" && find package.json package-lock.json tsconfig.json credentials nodes icons \
        -type f 2>/dev/null | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
    if [ -f "$NODE_PKG_DIR/dist/.build-hash" ] && [ "$(cat "$NODE_PKG_DIR/dist/.build-hash")" = "$hash" ]; then
        log "node package up to date: $NODE_PKG_DIR/dist"
        return 0
    fi
    local buildlog="$SANDBOX_DIR/n8n-node-build.log"
    mkdir -p "$SANDBOX_DIR"
    log "building the node package with the host's node $(node --version) (log: $buildlog)"
    # Install the locked dev tooling only when node_modules is missing or older than the lock file
    # (cold: ~2 min). `npm install --no-save` rather than `npm ci`: the registry reachable here
    # serves only the Linux builds of unrs-resolver's optional platform packages, so the lock has no
    # entries for the others and `npm ci` refuses it as "out of sync"; `install --no-save` installs
    # the locked versions and leaves the lock file alone.
    local ci="npm install --no-save --no-audit --no-fund --loglevel=warn"
    if [ -f "$NODE_PKG_DIR/node_modules/.package-lock.json" ] \
        && [ ! "$NODE_PKG_DIR/package-lock.json" -nt "$NODE_PKG_DIR/node_modules/.package-lock.json" ]; then
        ci=true
    fi
    if ! (cd "$NODE_PKG_DIR" && $ci && npm run build) >"$buildlog" 2>&1; then
        tail -n 40 "$buildlog" >&2 || true
        die "building the node package in $NODE_PKG_DIR failed (full log: $buildlog)"
    fi
    echo "$hash" >"$NODE_PKG_DIR/dist/.build-hash"
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
