"""rome-guard: a host-level runtime guard for GPU training hosts.

The package is laid out along the data path (see docs/architecture.md):
sensors produce events, the process table and attribution give them
context, detect/ decides, respond/ acts.
"""

__version__ = "0.1.0"

from rome_guard.gpu import register_current_process  # noqa: E402,F401
