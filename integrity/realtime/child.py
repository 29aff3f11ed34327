"""The daemon's side of a fanotify helper process: JSON lines on its stdin and stdout.

The writers' listener (actor.py) and the readers' listener (access.py) each keep their
fanotify group in a child process of their own (see actor.py for why). Starting one,
handing it its configuration, waiting for its greeting and stopping it is the same for
both, and lives here.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import IO, Any


def helper_command(module: str, entry: str) -> list[str]:
    """This interpreter, without site or environment, running `module.entry()` of this
    very package (found from this file, whatever the working directory)."""
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {parent!r}); "
            f"from {module} import {entry}; {entry}()")
    return [sys.executable or "python3", "-E", "-s", "-S", "-c", code]


def spawn(command: list[str], config: Any, timeout: float, what: str
          ) -> tuple[subprocess.Popen[bytes] | None, dict[str, Any] | str]:
    """Start the helper, send it `config`, and wait up to `timeout` seconds for its
    first message. Returns (process, greeting), or (process or None, why it failed)."""
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                close_fds=True)
    except OSError as exc:
        return None, f"fanotify unavailable: cannot start {what}: {exc.strerror}"
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        ready = first_message(proc.stdout, timeout)
    except (OSError, ValueError) as exc:
        return proc, f"fanotify unavailable: {what} failed to start: {exc}"
    if ready is None:
        return proc, f"fanotify unavailable: {what} did not start within {timeout:g} s"
    if not ready.get("ready"):
        return proc, f"fanotify unavailable: {what} exited while starting"
    return proc, ready


def first_message(stream: IO[bytes], timeout: float) -> dict[str, Any] | None:
    """The helper's first message, {} if it exited first, None after timeout seconds."""
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return None
    line = stream.readline()
    result: dict[str, Any] = json.loads(line) if line else {}
    return result


def stop(proc: subprocess.Popen[bytes] | None, thread: threading.Thread | None,
         join_timeout: float) -> bool:
    """Close the helper's stdin (its stop signal), reap it (killed after 5 s), then wait
    up to join_timeout for the thread filing its output. True if that thread ended."""
    if proc is not None:
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if thread is not None:
        thread.join(timeout=join_timeout)
        return not thread.is_alive()
    return True
