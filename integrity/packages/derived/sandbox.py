"""Running the system tools that make derived files again, and nothing else.

A tool runs only when its binary is a file its package shipped, unchanged (resolved
through links first, so the file checked is the file executed); with a clean
environment (no LD_PRELOAD, PATH of system directories only); cut off from the
network (a private network namespace through util-linux's `unshare`); as the user we
run as; and writing only into a private temporary directory. Where a tool insists on
writing elsewhere (ldconfig's aux-cache, fontconfig's cache directory) a private mount
namespace puts a temporary directory over that place for the tool alone.

`/etc/ld.so.preload` would load a library into every tool: while it names one, no tool
is run at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from integrity.packages.common import Verdict
from integrity.packages.pinned import preload_refusal
from integrity.paths import display

#: How long one tool may run before it is killed (its files then stay open).
TIMEOUT_S = 120
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_PRELOAD = "/etc/ld.so.preload"
#: Runs inside the namespaces: applies the bind and tmpfs mounts, then becomes the tool.
_MOUNTS = ('set -e; m="$1"; shift; while [ "$1" != "--" ]; do '
           'if [ "$1" = bind ]; then "$m" --bind "$2" "$3"; shift 3; '
           'else "$m" -t tmpfs -o mode=0700,size=64m tmpfs "$2"; shift 2; fi; done; '
           'shift; exec "$@"')


class ToolError(Exception):
    """A tool could not be run or failed; the message is a verdict's reason."""


@dataclass(frozen=True)
class Mount:
    """Inside the tool's mount namespace: `source` bound over `target`, or (source
    None) an empty tmpfs over `target`."""

    target: str
    source: str | None = None


class Sandbox:
    """Runs vouched-for tools; owns the temporary directories they write into.

    `vouch` answers whether a path is what its package shipped (the derivation
    context's cached package check).
    """

    def __init__(self, vouch: Callable[[bytes], Verdict]) -> None:
        self._vouch = vouch
        self._lock = threading.Lock()
        self._top: str | None = None
        self._checked: dict[str, str | ToolError] = {}
        self._isolation: list[str] | ToolError | None = None
        self._probe_lock = threading.Lock()

    def tempdir(self, prefix: str) -> str:
        """A fresh private directory, removed by close()."""
        with self._lock:
            if self._top is None:
                self._top = tempfile.mkdtemp(prefix="integrity-derive-")
                os.chmod(self._top, 0o700)
        return tempfile.mkdtemp(prefix=prefix, dir=self._top)

    def close(self) -> None:
        """Remove every temporary directory made for tools."""
        if self._top is not None:
            shutil.rmtree(self._top, ignore_errors=True)
            self._top = None

    def tool(self, path: str, owners: Sequence[str] = ()) -> str:
        """The real path of a vouched-for executable (raises ToolError saying why not).

        With `owners`, the file must be shipped by one of those packages (the package
        whose trigger the tool serves)."""
        with self._lock:
            found = self._checked.get(path)
        if found is None:
            found = self._check(path, owners)
            with self._lock:
                self._checked[path] = found
        if isinstance(found, ToolError):
            raise found
        return found

    def _check(self, path: str, owners: Sequence[str]) -> str | ToolError:
        real = os.path.realpath(path)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            return ToolError(f"{path} is not installed")
        verdict = self._vouch(os.fsencode(real))
        if not verdict.vouched:
            return ToolError(f"will not run {path}: {verdict.reason}")
        if owners and (verdict.package or "").split(":")[0] not in {
                o.split(":")[0] for o in owners}:
            return ToolError(f"will not run {path}: it is {verdict.package}'s, not "
                             f"{' or '.join(owners)}'s")
        return real

    def _isolate(self) -> list[str]:
        """The unshare command line that cuts the network off (and allows mounts)."""
        with self._probe_lock:
            if self._isolation is None:
                self._isolation = self._probe()
        if isinstance(self._isolation, ToolError):
            raise self._isolation
        return self._isolation

    def _probe(self) -> list[str] | ToolError:
        preloaded = preload_refusal(_PRELOAD)
        if preloaded is not None:
            return ToolError(f"{preloaded}: no tool is run while it does")
        try:
            unshare = self.tool("/usr/bin/unshare")
        except ToolError as exc:
            return ToolError(f"cannot cut tools off the network: {exc}")
        base = [unshare, "--net", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            base[1:1] = ["--user", "--map-current-user"]
        probe = subprocess.run([*base, "--", self.tool("/bin/true")], capture_output=True,
                               env={"PATH": _PATH, "LC_ALL": "C"}, timeout=TIMEOUT_S)
        if probe.returncode != 0:
            return ToolError("cannot cut tools off the network: unshare failed: "
                             + probe.stderr.decode(errors="replace").strip()[:200])
        return base

    def run(self, argv: Sequence[str], *, cwd: str, mounts: Sequence[Mount] = (),
            env: dict[str, str] | None = None, ok: Sequence[int] = (0,),
            stdin: bytes | None = None) -> bytes:
        """Run a tool (argv[0] from tool()) and return its stdout; raises ToolError."""
        command = self._isolate() + ["--"]
        if mounts:
            ops: list[str] = []
            for mount in mounts:
                ops += (["bind", mount.source, mount.target] if mount.source is not None
                        else ["tmpfs", mount.target])
            command += [self.tool("/bin/sh"), "-c", _MOUNTS, "sandbox",
                        self.tool("/bin/mount"), *ops, "--"]
        command += list(argv)
        environ = {"PATH": _PATH, "LC_ALL": "C", "HOME": cwd, "TMPDIR": cwd, **(env or {})}
        name = os.path.basename(argv[0])
        try:
            proc = subprocess.run(command, cwd=cwd, env=environ, capture_output=True,
                                  input=stdin if stdin is not None else b"",
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{name} did not finish within {TIMEOUT_S} s") from None
        except OSError as exc:
            raise ToolError(f"cannot run {name}: {exc.strerror}") from None
        if proc.returncode not in ok:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise ToolError(f"{name} failed (exit {proc.returncode})"
                            + (f": {err[-1][:200]}" if err else ""))
        return proc.stdout


def unusable(exc: ToolError, path: bytes) -> Verdict:
    """The verdict on a file whose tool could not be run."""
    return Verdict(False, f"cannot make {display(path)} again: {exc}")
