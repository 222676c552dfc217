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
# what went wrong instead (to ROME_GUARD_SLURM_LOG, when set).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
ROME_GUARD=${ROME_GUARD:-rome-guard}
log=${ROME_GUARD_SLURM_LOG:-/dev/null}

case "$SLURM_JOB_ID" in
  ''|*[!0-9]*) exit 0 ;;
esac
# a job given no GPU is not registered: a registration without GPUs would
# mean "any GPU". Indices are gres.conf order (see docs/gpu.md).
case "${SLURM_JOB_GPUS:-}" in
  ''|*[!0-9,]*) exit 0 ;;
esac
gpus="--gpus $SLURM_JOB_GPUS"

# --detach returns once the waiting helper is in a session of its own:
# slurmd kills the prolog's process group when the script ends, and the job
# starts only after that. The helper holds none of slurmd's descriptors.
# shellcheck disable=SC2086  # $ROME_GUARD may be "python -m rome_guard"; $gpus two words
$ROME_GUARD gpu register --slurm-job "$SLURM_JOB_ID" --wait 300 --detach $gpus \
  </dev/null >>"$log" 2>&1
exit 0
