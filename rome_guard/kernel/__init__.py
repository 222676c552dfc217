"""Everything that talks to the kernel's BPF side, in one layer that
sensors/ and respond/ both use and that imports neither.

- loader.py: the one loader (compile, memlock, programs on tracepoints
  and cgroups, pins, ring buffers, close());
- bpfsys.py: the bpf(2) calls libbcc lacks, and ``CgroupAttachments``, the
  one way a program is attached to a cgroup;
- stale.py: what a crashed rome-guard left attached or pinned, found and
  removed at the next start.

This package never decides what to watch, block or kill, and never reads
what a record means (rome_guard.layout does).
"""
