#!/bin/sh
# Slurm Prolog (slurm.conf: Prolog=/usr/local/libexec/rome-guard/slurm-prolog.sh).
#
# slurmd runs it as root on each node before the job starts, with an almost
# empty environment. The job's launcher (its batch script) does not exist
# yet, so a detached helper waits for it (scontrol listpids) and registers
# exactly that process, with the GPUs Slurm gave the job on this node
# (SLURM_JOB_GPUS) and the job name slurm-<id>. Children it starts (an
# agent's tool call) stay unregistered; see docs/gpu.md.
#
# A prolog that fails drains the node: this one always exits 0 and logs
# what went wrong instead (ROME_GUARD_SLURM_LOG, default syslog via logger).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
ROME_GUARD=${ROME_GUARD:-rome-guard}
log=${ROME_GUARD_SLURM_LOG:-}

case "$SLURM_JOB_ID" in
  ''|*[!0-9]*) exit 0 ;;
esac
gpus=
case "${SLURM_JOB_GPUS:-}" in
  ''|*[!0-9,]*) ;;  # no GPUs, or something this script does not understand
  *) gpus="--gpus $SLURM_JOB_GPUS" ;;
esac

report() {
  if [ -n "$log" ]; then cat >> "$log"; else logger -t rome-guard-prolog 2>/dev/null || cat >/dev/null; fi
}

# shellcheck disable=SC2086  # $ROME_GUARD may be "python -m rome_guard"; $gpus two words
# detached, and holding none of slurmd's descriptors: the job starts only
# after this script (and anything keeping its output open) is done
(setsid $ROME_GUARD gpu register --slurm-job "$SLURM_JOB_ID" --wait 300 $gpus 2>&1 | report) \
  </dev/null >/dev/null 2>&1 &
exit 0
