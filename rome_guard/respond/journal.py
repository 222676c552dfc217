"""The alert journal: one JSON object per line, durable before any action.

Every alert is appended, flushed and fsynced here before a responder may
kill or block anything, so a crash between decision and action never loses
the evidence. Records are built by rome_guard.findings (one shape for scan
and daemon) and are strict UTF-8 JSON on a single line whatever the
process put in its argv. This module never decides and never acts.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class Journal:
    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and make it durable (fsync) before returning."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")  # strict: textsafe already removed surrogates
        with self._lock:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
