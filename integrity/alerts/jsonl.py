"""The jsonl sink: one JSON object per line, flushed per alert, reopened on demand."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, TextIO


class JsonlSink:
    """Appends events to a file; `reopen` after logrotate moved it (SIGHUP)."""

    def __init__(self, path: str, min_severity: str = "low") -> None:
        self.path = path
        self.min_severity = min_severity
        self._lock = threading.Lock()
        self._file: TextIO | None = None

    def _open(self) -> TextIO:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        return self._file

    def send(self, event: dict[str, Any]) -> None:
        """Write one event as one line and flush it."""
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            handle = self._open()
            handle.write(line + "\n")
            handle.flush()

    def reopen(self) -> None:
        """Close the file so the next alert opens the path anew."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def close(self) -> None:
        """Release the file."""
        self.reopen()
