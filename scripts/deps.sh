#!/usr/bin/env bash
# Installs what building agentops needs on a Debian-like machine, when it is missing:
# a C compiler, pkg-config and OpenSSL headers (git2's https support), and git.
# Sourced by the other scripts; safe to run on its own.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  [ $# -gt 0 ] || return 0
  echo "installing: $*"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

build_deps=()
command -v git >/dev/null || build_deps+=(git)
command -v cc >/dev/null || build_deps+=(build-essential)
command -v pkg-config >/dev/null || build_deps+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || build_deps+=(libssl-dev)
apt_install "${build_deps[@]}"

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust from https://rustup.rs, then run this again" >&2
  exit 1
fi
