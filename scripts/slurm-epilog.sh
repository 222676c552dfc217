#!/bin/sh
# Slurm Epilog (slurm.conf: Epilog=/usr/local/libexec/rome-guard/slurm-epilog.sh).
#
# slurmd runs it as root on each node after the job ends: remove the
# registration the prolog made (job name slurm-<id>). Always exits 0: a
# failing epilog drains the node.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
ROME_GUARD=${ROME_GUARD:-rome-guard}
log=${ROME_GUARD_SLURM_LOG:-/dev/null}

case "$SLURM_JOB_ID" in
  ''|*[!0-9]*) exit 0 ;;
esac
# shellcheck disable=SC2086  # $ROME_GUARD may be "python -m rome_guard"
$ROME_GUARD gpu unregister --job "slurm-$SLURM_JOB_ID" </dev/null >>"$log" 2>&1
exit 0
