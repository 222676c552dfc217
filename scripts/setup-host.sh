#!/usr/bin/env bash
# Prepare a Debian 12 host (as root) for running and testing rome-guard.
#
# Idempotent: every step checks before it changes anything, so `make run` and
# `make test` call it every time. It installs Debian packages, makes kernel
# headers available to BCC (with the fallback from DESIGN.md when the running
# kernel has none), mounts tracefs/debugfs/bpffs, and builds the project venv
# in which `import bcc` works.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
log() { printf 'setup-host: %s\n' "$*" >&2; }

packages=(
  python3-bpfcc bpfcc-tools bpftool bpftrace iproute2 libcap2-bin procps
  openssh-server openssh-client autossh socat ncat netcat-traditional nodejs tmux
  prometheus gcc make git ca-certificates systemd
  slurmctld slurmd slurm-client munge
  openssl iperf3
  nmap iputils-ping
  rsyslog logrotate
)

install_packages() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The Debian prometheus package starts a server on :9090 when systemd is
  # present; the tests start their own, so make sure no stray one is left.
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
  stamp="$venv/.deps-stamp"
  local want
  want=$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing Python dependencies into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$repo[test,bench]"
    echo "$want" > "$stamp"
  fi
  "$venv/bin/python" -c 'import bcc' || { log "ERROR: import bcc fails in $venv"; return 1; }
}

install_packages
kernel_headers
mount_kernel_filesystems
build_venv
log "ready"
