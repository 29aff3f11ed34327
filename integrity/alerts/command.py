"""The exec sink: run a command per event, the event's JSON on its standard input.

Options of a `type = "exec"` table:

- `command` (required): argv as an array of strings, run without a shell;
  command[0] must be an absolute path (the daemon's PATH is not the admin's).
- `timeout` (seconds, default 30): then the command's whole process group is killed
  and the delivery fails.
- `env`: table of extra environment variables.

The command runs in a new session with cwd "/", inherits no file descriptor of ours,
and gets our environment minus systemd's (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*: a
notify script must not speak for the daemon), plus `env`, plus INTEGRITY_EVENT_ID,
INTEGRITY_PATH, INTEGRITY_SEVERITY and INTEGRITY_KIND. Its standard output is
discarded; a non-zero exit fails the delivery with the status and the last line of
standard error. Standard error goes to an unlinked temporary file, not a pipe, so a
chatty command cannot fill our memory and a background child left holding it cannot
keep us waiting.
"""

from __future__ import annotations

from collections.abc import Sequence

import os
import signal
import subprocess
import tempfile
from typing import Any, TYPE_CHECKING

from integrity.alerts import DeliveryError, json_line
from integrity.alerts.options import Options
from integrity.paths import escape

if TYPE_CHECKING:
    from integrity.store.events import EventDoc

_OURS = ("INTEGRITY_EVENT_ID", "INTEGRITY_PATH", "INTEGRITY_SEVERITY", "INTEGRITY_KIND")
_SYSTEMD = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID",
            "LISTEN_FDNAMES")
_TAIL = 4096


class CommandSink:
    """Runs a command for each event."""

    digest = False
    interval = 0.0

    def __init__(self, name: str, min_severity: str = "low", *, command: list[str],
                 timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.min_severity = min_severity
        self.command = list(command)
        self.timeout = timeout
        self.env = dict(env or {})

    def deliver(self, events: Sequence[EventDoc]) -> None:
        """Run the command once per event; fail on a non-zero exit or a timeout."""
        for event in events:
            self._run(event)

    def _environment(self, event: EventDoc) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD}
        env.update(self.env)
        env.update({"INTEGRITY_EVENT_ID": str(event.get("id")),
                    "INTEGRITY_PATH": str(event.get("path")).replace("\0", "\\x00"),
                    "INTEGRITY_SEVERITY": str(event.get("severity")),
                    "INTEGRITY_KIND": str(event.get("kind"))})
        return env

    def _run(self, event: EventDoc) -> None:
        data = (json_line(event) + "\n").encode("utf-8")
        shown = self.command[0]
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=stderr, close_fds=True, start_new_session=True, cwd="/",
                    env=self._environment(event))
            except OSError as exc:
                raise DeliveryError(self.name, f"exec {shown}: "
                                               f"{exc.strerror or exc}") from None
            try:
                proc.communicate(data, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise DeliveryError(self.name, f"exec {shown}: timed out after "
                                               f"{self.timeout:g} s (process group killed)"
                                    ) from None
            except BaseException:
                _kill_group(proc)  # interrupted: leave nothing running behind us
                raise
            if proc.returncode == 0:
                return
            if proc.returncode < 0:
                try:
                    status = f"killed by {signal.Signals(-proc.returncode).name}"
                except ValueError:
                    status = f"killed by signal {-proc.returncode}"
            else:
                status = f"exit status {proc.returncode}"
            last = _last_line(stderr)
            raise DeliveryError(self.name, f"exec {shown}: {status}"
                                           + (f": {last}" if last else ""))

    def reopen(self) -> None:
        """Nothing stays open between deliveries."""

    def close(self) -> None:
        """Nothing stays open between deliveries."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # start_new_session made the child a group leader: its pid is the group id.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(handle: Any) -> str:
    """The last non-empty line of what a command wrote to standard error."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(size - _TAIL, 0))
    lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    return escape(lines[-1].strip())[:300] if lines else ""


def build(options: Options) -> CommandSink:
    """An exec sink from its [[alert]] table."""
    command = options.strings("command")
    if not command[0].startswith("/"):
        raise options.fail("command", f"command[0] must be an absolute path, not "
                                      f"{command[0]!r}")
    if any("\0" in arg for arg in command):
        raise options.fail("command", "must not contain a NUL character")
    env = options.environment("env")
    for name in env:
        if name in _OURS:
            raise options.fail(f"env.{name}", "is set by integrity for each event")
    return CommandSink(options.name, options.min_severity, command=command,
                       timeout=options.number("timeout", 30.0), env=env)
