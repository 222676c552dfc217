#!/usr/bin/env bash
# End-to-end check of GPU consumer detection on a real NVIDIA host, as root.
#
# It starts real CUDA processes with PyTorch and checks, through the NVML
# sensor, the job registry and `rome-guard gpu list --json`, that:
#   1. NVML answers and lists the GPU(s);
#   2. a new CUDA process shows up as an UNREGISTERED consumer within the poll
#      interval, with its memory;
#   3. registering it (by index, then by UUID) clears the finding, and a grant
#      of another GPU is reported as gpu_not_granted;
#   4. a CUDA child of a registered parent stays unregistered unless the
#      parent was registered with --include-children;
#   5. accounting mode catches a CUDA process that starts and ends between
#      two polls (SKIP where the driver does not permit accounting);
#   6. `rome-guard run --mode enforce` kills an unregistered consumer and spares
#      a registered one.
#
# Needs no network and installs nothing: PyTorch, nvidia-ml-py, click and
# PyYAML must already be importable by $PYTHON (default python3). Runs from the
# repository with PYTHONPATH=<repo>, registrations in a temporary run dir.
# Prints PASS/FAIL/SKIP per step; exit 0 if nothing failed, 1 if a step
# failed, 2 if a prerequisite is missing. Cleans up every process it started.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
PY=${PYTHON:-python3}
POLL_INTERVAL=${ROME_GUARD_GPU_POLL_INTERVAL:-5}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
work=$(mktemp -d /tmp/rg-gpu-check.XXXXXX)
export ROME_GUARD_RUN_DIR="$work/run"
export ROME_GUARD_CONFIG="$work/config.yaml"
printf 'gpu:\n  poll_interval: %s\n' "$POLL_INTERVAL" >"$ROME_GUARD_CONFIG"

started=()  # pids this script started, ended one by one on exit
passed=0 failed=0 skipped=0

cleanup() {
  local pid
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    pid=${started[i]}
    kill -KILL "$pid" 2>/dev/null
  done
  for pid in "${started[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

pass() { echo "PASS  $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
skip() { echo "SKIP  $*"; skipped=$((skipped + 1)); }
info() { echo "      $*"; }
rg() { "$PY" -m rome_guard gpu "$@"; }

# --- prerequisites -----------------------------------------------------------
echo "rome-guard GPU check: repo $repo, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)"
if [ "$(id -u)" != 0 ]; then
  echo "FAIL  prerequisites: run as root (NVML lists other users' processes and accounting needs root)"
  exit 2
fi
missing=$("$PY" - <<'EOF'
import importlib
names = {"pynvml": "nvidia-ml-py", "click": "click", "yaml": "PyYAML", "torch": "torch"}
gone = []
for module, package in names.items():
    try:
        importlib.import_module(module)
    except Exception:
        gone.append(f"{module} (pip package {package})")
print(", ".join(gone))
EOF
)
if [ -n "$missing" ]; then
  echo "FAIL  prerequisites: cannot import: $missing -- install them first; this script fetches nothing"
  exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "FAIL  prerequisites: torch.cuda.is_available() is False"
  exit 2
fi
pass "prerequisites: root, pynvml, click, PyYAML, torch with CUDA"

# A CUDA process: allocates MiB on cuda:0, says READY, holds it for seconds.
cat >"$work/holder.py" <<'EOF'
import sys, time
import torch
mib, hold = int(sys.argv[1]), float(sys.argv[2])
block = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda:0")
block.fill_(7)
torch.cuda.synchronize()
print("READY", flush=True)
time.sleep(hold)
EOF

# wait_ready FILE: until the holder writing FILE printed READY (120 s for CUDA init)
wait_ready() {
  local file=$1 i
  for ((i = 0; i < 240; i++)); do
    grep -q READY "$file" 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

# consumer PID [GPU_INDEX]: "status job inside_job used_memory_bytes exit_code" from gpu list --json
consumer() {
  local pid=$1 out code
  out=$(rg list --json 2>"$work/list.err")
  code=$?
  printf '%s' "$out" >"$work/last-list.json"
  printf '%s' "$out" | "$PY" -c '
import json, sys
pid, code = int(sys.argv[1]), sys.argv[2]
try:
    doc = json.load(sys.stdin)
except ValueError:
    print("nojson - - - " + code); sys.exit()
for gpu in doc["gpus"]:
    for p in gpu["processes"]:
        if p["pid"] == pid:
            print(p["status"], p["job"] or "-", p["inside_job"] or "-", p["used_memory_bytes"], code)
            sys.exit()
print("absent - - - " + code)
' "$pid" "$code"
}

show_listing() {
  info "gpu list said (stderr: $(tr '\n' ' ' <"$work/list.err" | cut -c1-300)):"
  "$PY" -c '
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except Exception as exc:
    print("      (no JSON:", exc, ")"); sys.exit()
print("      nvml:", doc["nvml"])
for gpu in doc["gpus"]:
    print("      GPU", gpu["index"], gpu["uuid"], "failing" if gpu["failing"] else "",
          [(p["pid"], p["status"]) for p in gpu["processes"]])
' "$work/last-list.json"
}

# GPU_CHECK_STEPS="1 6" runs only those steps (default: all)
want() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

# --- 1. NVML answers -----------------------------------------------------------
if "$PY" - >"$work/inventory.txt" 2>&1 <<'EOF'
from rome_guard.sensors.nvml import NvmlSensor
with NvmlSensor(accounting=False) as sensor:
    snap = sensor.poll()
    print("driver", sensor.driver_version, "available", snap.available, snap.reason)
    for d in snap.devices:
        print(f"GPU {d.index} {d.uuid} {d.name!r} power={d.power_mw}mW "
              f"mem={d.memory_used_bytes}/{d.memory_total_bytes} util={d.utilization}% "
              f"mig={d.mig_enabled} ({len(d.mig_devices)} MIG devices)")
    print("processes", len(snap.processes), "errors", sensor.error_counts())
    raise SystemExit(0 if snap.available and snap.devices else 1)
EOF
then
  pass "NVML sensor: $(head -1 "$work/inventory.txt")"
  sed 's/^/      /' "$work/inventory.txt" | tail -n +2
else
  fail "NVML sensor did not list a GPU:"
  sed 's/^/      /' "$work/inventory.txt"
  echo "summary: $passed passed, $failed failed, $skipped skipped"
  exit 1
fi
gpu0_uuid=$("$PY" -c '
from rome_guard.sensors.nvml import NvmlSensor
with NvmlSensor(accounting=False) as s:
    print(s.devices()[0].uuid)
')
mig_mode=$(grep -c "mig=True" "$work/inventory.txt")

# --- 2. a new CUDA process is an unregistered consumer -----------------------------
if want 2; then
"$PY" "$work/holder.py" 512 600 >"$work/holder.out" 2>&1 &
holder=$!
started+=("$holder")
if ! wait_ready "$work/holder.out"; then
  fail "CUDA holder did not start: $(tail -3 "$work/holder.out" | tr '\n' ' ')"
  echo "summary: $passed passed, $failed failed, $skipped skipped"
  exit 1
fi
ready_at=$(date +%s.%N)
seen=""
while :; do
  read -r status job inside memory code <<<"$(consumer "$holder")"
  elapsed=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.1f}')" "$(date +%s.%N)" "$ready_at")
  if [ "$status" = unregistered ]; then
    seen=yes
    break
  fi
  "$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$elapsed" "$POLL_INTERVAL" || break
  sleep 0.5
done
if [ -n "$seen" ] && [ "$code" = 1 ]; then
  pass "unregistered CUDA process pid $holder reported after ${elapsed}s (poll interval ${POLL_INTERVAL}s), memory $memory B, gpu list exit 1"
  if [[ $memory =~ ^[0-9]+$ ]] && [ "$memory" -lt $((512 * 1024 * 1024)) ]; then
    info "note: NVML reports less memory than the 512 MiB allocated"
  fi
else
  fail "pid $holder not reported as unregistered within ${POLL_INTERVAL}s (status $status, exit $code)"
  show_listing
fi

fi

# --- 3. registration clears it; grants are checked ---------------------------------
if want 3; then
rg register --pid "$holder" --job gpu-check --gpus 0 >"$work/reg.out" 2>&1 || info "register: $(cat "$work/reg.out")"
read -r status job inside memory code <<<"$(consumer "$holder")"
if [ "$status" = registered ] && [ "$job" = gpu-check ]; then
  pass "registered by index: pid $holder is 'registered' as job gpu-check (gpu list exit $code; 1 means other consumers on this host)"
else
  fail "after register --gpus 0: status $status job $job"
  show_listing
fi
rg unregister --pid "$holder" >/dev/null
rg register --pid "$holder" --job gpu-check --gpus "$gpu0_uuid" >/dev/null 2>&1
read -r status job inside memory code <<<"$(consumer "$holder")"
[ "$status" = registered ] && pass "registered by UUID $gpu0_uuid" || { fail "register by UUID: status $status"; show_listing; }
rg unregister --job gpu-check >/dev/null
rg register --pid "$holder" --job gpu-check --gpus 99 >/dev/null 2>&1
read -r status job inside memory code <<<"$(consumer "$holder")"
[ "$status" = gpu_not_granted ] && pass "a grant of another GPU is reported as gpu_not_granted" || { fail "grant of GPU 99: status $status"; show_listing; }
rg unregister --job gpu-check >/dev/null
read -r status job inside memory code <<<"$(consumer "$holder")"
[ "$status" = unregistered ] && pass "unregister: pid $holder is unregistered again" || fail "after unregister: status $status"

fi

# --- 4. a CUDA child of a registered parent -----------------------------------------
if want 4; then
bash -c '"$1" "$2" 256 600 >"$3" 2>&1 & echo $! >"$4"; wait' _ "$PY" "$work/holder.py" "$work/child.out" "$work/child.pid" &
parent=$!
started+=("$parent")
for ((i = 0; i < 50; i++)); do [ -s "$work/child.pid" ] && break; sleep 0.1; done
child=$(cat "$work/child.pid" 2>/dev/null)
if [ -z "$child" ] || ! wait_ready "$work/child.out"; then
  fail "CUDA child did not start: $(tail -3 "$work/child.out" 2>/dev/null | tr '\n' ' ')"
else
  started+=("$child")
  rg register --pid "$parent" --job agent-episode >/dev/null
  for ((i = 0; i < 2 * POLL_INTERVAL; i++)); do
    read -r status job inside memory code <<<"$(consumer "$child")"
    [ "$status" != absent ] && break
    sleep 0.5
  done
  if [ "$status" = unregistered ] && [ "$inside" = agent-episode ]; then
    pass "CUDA child $child of registered parent $parent is unregistered, inside job agent-episode"
  else
    fail "child of a parent registered without --include-children: status $status inside $inside"
    show_listing
  fi
  rg unregister --pid "$parent" >/dev/null
  rg register --pid "$parent" --job agent-episode --include-children >/dev/null
  read -r status job inside memory code <<<"$(consumer "$child")"
  [ "$status" = registered ] && pass "with --include-children the child is covered" || { fail "with --include-children: status $status"; show_listing; }
  rg unregister --job agent-episode >/dev/null
fi

fi

# --- 5. accounting catches a process that starts and ends between polls -------------
if want 5; then
if [ "$mig_mode" != 0 ]; then
  skip "accounting: GPU in MIG mode, where NVML has no accounting"
else
  "$PY" - "$work/holder.py" >"$work/acct.out" 2>&1 <<'EOF'
import subprocess, sys, time
from rome_guard.sensors.nvml import NvmlSensor
with NvmlSensor(poll_interval=60, accounting=True) as sensor:
    if not sensor.poll().devices[0].accounting:
        print("SKIP accounting mode not permitted:", sensor.error_counts())
        sys.exit(3)
    short = subprocess.Popen([sys.executable, sys.argv[1], "128", "0"], stdout=subprocess.PIPE)
    short.communicate()
    finished = []
    for _ in range(10):  # the driver may file the record a moment after the exit
        finished += [(f.pid, f.max_memory_bytes) for f in sensor.poll().finished]
        if any(pid == short.pid for pid, _ in finished):
            break
        time.sleep(0.5)
    print(f"short-lived CUDA pid {short.pid}; finished between polls: {finished}")
    print("errors:", sensor.error_counts())
    sys.exit(0 if any(pid == short.pid for pid, _ in finished) else 1)
EOF
  rc=$?
  if [ $rc = 3 ]; then
    skip "accounting: $(grep SKIP "$work/acct.out" | cut -c6-)"
  elif [ $rc = 0 ]; then
    pass "accounting: $(grep 'finished between polls' "$work/acct.out")"
  else
    fail "accounting did not report the short-lived CUDA process:"
    sed 's/^/      /' "$work/acct.out"
  fi
fi

fi

# --- 6. enforce mode kills an unregistered consumer, spares a registered one --------
# The daemon runs with only the GPU rule enabled: this host's own tooling must not
# meet the shipped miner/tunnel/shell rules in enforce mode.
others=$("$PY" -m rome_guard rules list --json --config /dev/null 2>/dev/null | "$PY" -c '
import json, sys
print(", ".join(r["id"] for r in json.load(sys.stdin) if r["category"] != "gpu_unregistered"))')
journal="$work/alerts.jsonl"
printf 'rules: []\ndisabled_rules: [%s]\nrun_dir: %s\ngpu:\n  poll_interval: %s\n' \
  "$others" "$ROME_GUARD_RUN_DIR" "$POLL_INTERVAL" >"$work/enforce.yaml"
"$PY" "$work/holder.py" 256 600 >"$work/keep.out" 2>&1 &
keep=$!; started+=("$keep")
if ! wait_ready "$work/keep.out"; then
  fail "enforce: the registered holder did not start: $(tail -3 "$work/keep.out")"
else
  rg register --pid "$keep" --gpus 0 --job keep-me >/dev/null
  "$PY" -m rome_guard run --mode enforce --config "$work/enforce.yaml" --alerts-file "$journal" \
    --run-dir "$ROME_GUARD_RUN_DIR" --metrics-addr '' >"$work/daemon.log" 2>&1 &
  guard=$!; started+=("$guard")
  for ((i = 0; i < 240; i++)); do grep -q "rome-guard running" "$work/daemon.log" && break; sleep 0.5; done
  info "$(grep -m1 "rome-guard running" "$work/daemon.log")"
  "$PY" "$work/holder.py" 256 600 >"$work/victim.out" 2>&1 &
  victim=$!; started+=("$victim")
  began=$(date +%s.%N)
  for ((i = 0; i < 8 * POLL_INTERVAL + 240; i++)); do kill -0 "$victim" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$victim" 2>/dev/null; then
    fail "enforce: the unregistered CUDA process $victim is still alive"
    sed 's/^/      /' "$work/daemon.log" | tail -20
  else
    died=$("$PY" -c "import time; print(round(time.time() - $began, 2))")
    verdict=$("$PY" -c '
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
pid = int(sys.argv[2])
mine = [r for r in records if r.get("process", {}).get("pid") == pid]
alert = next((r for r in mine if r.get("event") == "alert" and r["rule"] == "gpu-unregistered-consumer"), None)
response = next((r for r in mine if r.get("event") == "response"), None)
gpu = (alert or {}).get("gpu") or {}
confirmed = [r["gpu"]["uuid"] for r in records if r.get("event") == "confirmed"]
print(alert is not None, response["action"] if response else "-", (alert or {}).get("gpu_source", "-"),
      gpu.get("uuid") or (confirmed[0] if confirmed else "-"))
' "$journal" "$victim")
    read -r alerted action source uuid <<<"$verdict"
    if [ "$alerted" = True ] && [ "$action" = killed ]; then
      pass "enforce: unregistered CUDA process killed ${died}s after start (alert from $source, GPU $uuid)"
    else
      fail "enforce: process died but the journal says alerted=$alerted action=$action"
      sed 's/^/      /' "$work/daemon.log" | tail -10
    fi
  fi
  if kill -0 "$keep" 2>/dev/null; then
    pass "enforce: the registered job survived"
  else
    fail "enforce: the registered job was killed"
  fi
  kill -TERM "$guard" 2>/dev/null
  wait "$guard"; rc=$?
  if [ "$rc" = 0 ] && grep -q "rome-guard stopped" "$work/daemon.log"; then
    pass "enforce: daemon stopped cleanly (exit 0)"
  else
    fail "enforce: daemon exit $rc: $(tail -3 "$work/daemon.log")"
  fi
fi

echo "summary: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
