#!/usr/bin/env bash
# Prepare a host (as root) for running, and optionally testing, rome-guard.
#
#   scripts/setup-host.sh          what the guard needs (`make run`): BCC for
#                                  the system Python, kernel headers, bpftool,
#                                  iproute2, the ssh client (ssh -G), the venv
#   scripts/setup-host.sh --test   plus the test bed (`make test`): sshd,
#                                  Slurm, Prometheus, ncat, nmap, iperf3,
#                                  rsyslog, docker.io, debootstrap, nspawn, ...
#   scripts/setup-host.sh --print [--test] [--os-release FILE]
#                                  print what would be installed on this (or
#                                  FILE's) distribution and change nothing
#   scripts/setup-host.sh --bcc-package [--os-release FILE]
#                                  print the distribution's BCC package for
#                                  its python3 (`make install` names it)
#
# Package names come from /etc/os-release (Debian 12/13, Ubuntu 22.04/24.04,
# RHEL/Rocky/Alma 9; docs/install.md). Installing is done on Debian and
# Ubuntu (apt); on RHEL-like hosts --print says what to `dnf install`.
#
# Idempotent: every step checks before it changes anything, so `make run` and
# `make test` call it every time. It installs packages, makes kernel headers
# available to BCC (with the fallback from DESIGN.md when the running kernel
# has none), mounts tracefs/debugfs/bpffs, and builds the project venv in
# which `import bcc` works. It never starts a service.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
log() { printf 'setup-host: %s\n' "$*" >&2; }

usage() {
  echo "usage: setup-host.sh [--test] [--print | --bcc-package] [--os-release FILE]" >&2
  exit 2
}

test_bed=no print_only=no bcc_only=no os_release=/etc/os-release
while [ $# -gt 0 ]; do
  case "$1" in
    --test) test_bed=yes ;;
    --print) print_only=yes ;;
    --bcc-package) bcc_only=yes ;;
    --os-release) [ $# -ge 2 ] || usage; os_release=$2; shift ;;
    *) usage ;;
  esac
  shift
done

# The distribution, as os-release names it: "debian 12", "ubuntu 22.04",
# "rhel 9" (Rocky, Alma and CentOS Stream count as rhel).
distribution() {
  [ -r "$os_release" ] || { log "ERROR: cannot read $os_release"; return 1; }
  (
    # shellcheck disable=SC1090
    . "$os_release"
    version=${VERSION_ID:-}
    case "${ID:-} ${ID_LIKE:-}" in
      "debian "* | "ubuntu "*) echo "${ID} ${version}" ;;
      rhel* | rocky* | almalinux* | centos* | *" rhel"* | *" fedora"*) echo "rhel ${version%%.*}" ;;
      *" debian"* | *" ubuntu"*) echo "debian ${version}" ;;
      *) echo "unknown ${ID:-?}" ;;
    esac
  )
}

kernel=$(uname -r)

# What the guard itself needs, per distribution: BCC built for the system
# Python, the venv module, kernel headers for BCC's compile, bpftool
# (stale clean-up and diagnostics), iproute2 (tc) and the ssh client
# (ssh -G answers which forwards a config sets up).
guard_packages() {
  case "$1" in
    "debian "*)
      echo python3 python3-venv python3-bpfcc bpftool iproute2 procps openssh-client make
      ;;
    "ubuntu "*)
      echo python3 python3-venv python3-bpfcc "linux-tools-$kernel" linux-tools-common \
        iproute2 procps openssh-client make
      ;;
    "rhel "*)
      echo python3 python3-bcc bpftool iproute procps-ng openssh-clients make
      ;;
    *) return 1 ;;
  esac
}

bcc_package() {
  case "$1" in
    "debian "* | "ubuntu "*) echo python3-bpfcc ;;
    "rhel "*) echo python3-bcc ;;
    *) return 1 ;;
  esac
}

# The kernel header package BCC compiles against (installed separately:
# Debian VMs may have none for their kernel, then a fallback is linked).
header_package() {
  case "$1" in
    "debian "* | "ubuntu "*) echo "linux-headers-$kernel" ;;
    "rhel "*) echo "kernel-devel-$kernel" ;;
  esac
}

# The test bed (`make test`): real services the tests start and talk to.
# Debian only: the tests run on Debian 12 (CI and these machines).
test_packages=(
  bpfcc-tools bpftrace libcap2-bin gcc git ca-certificates systemd openssl
  openssh-server autossh socat ncat netcat-traditional nodejs tmux nmap iputils-ping
  iperf3 rsyslog logrotate
  prometheus slurmctld slurmd slurm-client munge
  debootstrap systemd-container docker.io
)

print_plan() {
  local dist=$1
  echo "distribution: $dist (from $os_release)"
  echo "guard: $(guard_packages "$dist")"
  echo "bcc: $(bcc_package "$dist")"
  echo "kernel headers: $(header_package "$dist")"
  if [ "$test_bed" = yes ]; then
    case "$dist" in
      "debian "*) echo "test: ${test_packages[*]}" ;;
      *) echo "test: only on Debian 12 (the test bed's distribution)" ;;
    esac
  fi
  case "$dist" in
    "rhel "*) echo "install with: dnf install -y $(guard_packages "$dist") $(header_package "$dist")" ;;
    *)
      echo "install with: apt-get install -y --no-install-recommends" \
        "$(guard_packages "$dist") $(header_package "$dist")"
      ;;
  esac
}

install_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # policy-rc.d: packages such as docker.io, prometheus and rsyslog would
    # start their services where systemd runs; the tests start their own
    mkdir -p /usr/sbin
    local policy=/usr/sbin/policy-rc.d had_policy=no
    [ -e "$policy" ] && had_policy=yes
    [ "$had_policy" = yes ] || printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      { [ "$had_policy" = yes ] || rm -f "$policy"; return 1; }
    [ "$had_policy" = yes ] || rm -f "$policy"
  fi
  return 0
}
# BCC compiles against /lib/modules/$(uname -r)/build. Real GPU hosts ship
# matching headers; VM kernels often do not, and then the closest Debian
# headers work for tracepoint programs (layouts come from tracefs at run time).
kernel_headers() {
  local rel mod
  rel=$(uname -r)
  mod="/lib/modules/$rel"
  if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/Makefile" ]; then
    return 0
  fi
  if apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "linux-headers-$rel" >/dev/null 2>&1; then
    log "installed matching kernel headers linux-headers-$rel"
    return 0
  fi
  if ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends linux-headers-amd64 >/dev/null
  fi
  local arch common
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch" ] || [ -z "$common" ]; then
    log "ERROR: no kernel headers for $rel and no Debian fallback headers found"
    return 1
  fi
  mkdir -p "$mod"
  ln -sfn "$arch" "$mod/build"
  ln -sfn "$common" "$mod/source"
  log "NOTICE: no kernel headers match $rel; using Debian fallback headers"
  log "        $mod/build -> $arch (tracepoint programs only; layouts come from tracefs)"
}

mount_kernel_filesystems() {
  mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
  mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
}

# The venv uses the interpreter found first on PATH; Debian's bcc package is
# pure Python over libbcc, so one link to it (not the whole dist-packages tree)
# is exposed through a .pth file.
build_venv() {
  local py stamp
  py=$(command -v python3)
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$venv/debian-bcc"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$venv/debian-bcc/bcc"
  echo "$venv/debian-bcc" > "$site/debian-bcc.pth"
  # the guard's own dependencies for `make run`; the test and bench extras
  # (pytest, ruff, vermin, ...) only for `make test`. A venv set up for the
  # tests serves `make run` as it is.
  local extras="" want
  [ "$test_bed" = no ] || extras="[test,bench]"
  stamp="$venv/.deps-stamp"
  want=$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || { [ "$(cat "$stamp")" != "$want$extras" ] &&
    [ "$(cat "$stamp")" != "$want[test,bench]" ]; }; then
    log "installing Python dependencies into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$repo$extras"
    echo "$want$extras" > "$stamp"
  fi
  "$venv/bin/python" -c 'import bcc' || { log "ERROR: import bcc fails in $venv"; return 1; }
}

dist=$(distribution)
if [ "$bcc_only" = yes ]; then
  bcc_package "$dist" || { log "ERROR: unsupported distribution: $dist"; exit 2; }
  exit 0
fi
if [ "$print_only" = yes ]; then
  guard_packages "$dist" >/dev/null || { log "ERROR: unsupported distribution: $dist"; exit 2; }
  print_plan "$dist"
  exit 0
fi
case "$dist" in
  "debian "* | "ubuntu "*) ;;
  *)
    log "ERROR: $dist: this script installs with apt only; on RHEL-like hosts:"
    print_plan "$dist" >&2
    exit 2
    ;;
esac
# shellcheck disable=SC2046
install_packages $(guard_packages "$dist")
[ "$test_bed" = no ] || install_packages "${test_packages[@]}"
kernel_headers
mount_kernel_filesystems
build_venv
log "ready"
