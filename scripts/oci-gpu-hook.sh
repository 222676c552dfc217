#!/bin/sh
# OCI createRuntime hook: registers a container's process as a GPU job, for
# sites that keep gpu.trust: process under Kubernetes (docs/gpu.md).
#
# The runtime (runc, crun through containerd or CRI-O) runs it on the node,
# in the runtime's namespaces, once the container's process exists and
# before its entrypoint starts, with the container's OCI state on stdin.
# `rome-guard gpu register --oci-state -` registers that process (pid and
# start time, which survive the exec into the entrypoint) for the GPUs the
# device plugin gave it (NVIDIA_VISIBLE_DEVICES in the bundle), named after
# its pod. A container given no GPU, or NVIDIA_VISIBLE_DEVICES=all, is not
# registered. What the entrypoint starts later stays unregistered.
#
# Not createContainer: those hooks run in the container's mount namespace,
# where neither rome-guard nor the node's /run/rome-guard is.
#
# A hook that fails fails the container: this one always exits 0 and logs
# what went wrong instead (to ROME_GUARD_OCI_LOG, when set). Without a
# registration the process is an unregistered GPU consumer (fails closed).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
ROME_GUARD=${ROME_GUARD:-rome-guard}
log=${ROME_GUARD_OCI_LOG:-/dev/null}
# shellcheck disable=SC2086  # $ROME_GUARD may be "python -m rome_guard"
$ROME_GUARD gpu register --oci-state - >>"$log" 2>&1
exit 0
