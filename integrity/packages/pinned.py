"""The tools whose word is evidence, believed only as the integrity baseline recorded them.

gpgv's verdict on an InRelease and dpkg-deb's reading of a .deb are what the
signed-archive evidence rests on, and both are root-writable files, as is every
library they load. So before a tool is run, its executable (links resolved: the real
path is what is checked and what is executed, never a PATH lookup), its ELF
interpreter and every shared library ld.so could load for it (`elfdeps`) must each
hold exactly the bytes the baseline records for that path, judged by the same check
that pins apt's keyrings (`Approver.baseline_check`); /etc/ld.so.preload must be
absent or empty; no enabled binfmt_misc entry may claim the executable (the kernel
would run that entry's interpreter in its place); and the tool runs with a fixed
environment (no LD_*, no PATH of the caller's). The pin is to the baseline, not to
dpkg's database: this evidence must hold when dpkg's database lies.

Each tool is checked once per instance (one approval run). A tool upgraded since the
baseline (gpgv in the same upgrade, or any library of its closure, libc included) is
refused like a replaced one: nothing on the host can tell an upgrade from a forgery
without a trusted verifier, so its own update is approved first, by name (`integrity
approve /usr/bin/gpgv ...`), and the package evidence asked again.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from integrity.packages.elfdeps import ElfError, closure, read_cache

#: (real path, bytes) -> None when these are the bytes the baseline recorded for that
#: path, else why not ("differs from the integrity baseline", ...).
BaselineCheck = Callable[[str, bytes], "str | None"]

PRELOAD = "/etc/ld.so.preload"
#: Where the kernel's binfmt_misc entries are listed (when it is mounted there).
BINFMT_MISC = "/proc/sys/fs/binfmt_misc"
#: Everything a pinned tool sees of the environment, besides what a caller adds.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class ToolRefused(Exception):
    """A tool's word may not be used; the message names the file at fault and why."""


def preload_refusal(path: str | None = None) -> str | None:
    """Why no tool may run while `path` (/etc/ld.so.preload) names a library, or None
    when it is absent or empty: ld.so would load what it names into every program."""
    path = PRELOAD if path is None else path
    try:
        with open(path, "rb") as handle:
            if not handle.read().strip():
                return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    return f"{path} names a library that every program would load"


def binfmt_refusal(real: str, head: bytes, directory: str | None = None) -> str | None:
    """Why `real` would not run as the program it is, or None: an enabled binfmt_misc
    entry matches its first bytes (`head`) or its name's extension, and the kernel asks
    binfmt_misc before its own ELF loader, so that entry's interpreter would run
    instead, fed the judged file. An entry that cannot be read counts as matching.

    Limit: only the instance mounted at `directory` is seen; one registered through a
    mount made in another mount namespace is not listed here."""
    directory = BINFMT_MISC if directory is None else directory
    try:
        names = sorted(os.listdir(directory))
        with open(os.path.join(directory, "status"), "rb") as handle:
            if handle.read().strip() == b"disabled":
                return None
    except OSError:
        return None
    buf = head[:256].ljust(256, b"\0")  # the kernel's BINPRM_BUF_SIZE, zero-filled
    for name in names:
        if name in ("register", "status"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                lines = handle.read().decode("ascii", "replace").splitlines()
        except OSError as exc:
            return f"binfmt_misc entry {path} cannot be read ({exc.strerror})"
        if not lines or lines[0] != "enabled":
            continue
        fields = dict(line.partition(" ")[::2] for line in lines[1:])
        if "extension" in fields:
            # The kernel compares what follows the last dot of the executed path.
            dot = real.rfind(".")
            matches = dot >= 0 and "." + real[dot + 1:] == fields["extension"]
        else:
            try:
                offset = int(fields.get("offset", "0"))
                magic = bytes.fromhex(fields.get("magic", ""))
                mask = bytes.fromhex(fields["mask"]) if "mask" in fields \
                    else b"\xff" * len(magic)
            except ValueError:
                return f"binfmt_misc entry {path} cannot be read"
            matches = all((buf[offset + i] ^ magic[i]) & mask[i] == 0
                          for i in range(len(magic)) if offset + i < len(buf))
        if matches:
            return (f"binfmt_misc entry {path} would run {fields.get('interpreter', '?')} "
                    f"in place of {real}")
    return None


class PinnedTools:
    """Resolves tools to the real path of an executable whose whole ELF closure the
    baseline vouches for (`check`; None: no baseline, so no tool is trusted)."""

    def __init__(self, check: BaselineCheck | None, preload: str | None = None,
                 binfmt: str | None = None) -> None:
        self._check = check
        self._preload = preload
        self._binfmt = binfmt
        self._cache: dict[str, list[str]] | None = None
        self._tools: dict[str, str | ToolRefused] = {}

    def resolve(self, path: str) -> str:
        """The real path to execute `path` by; ToolRefused saying which file is not
        as the baseline recorded it (checked once per instance)."""
        if path not in self._tools:
            try:
                self._tools[path] = self._judge(path)
            except ToolRefused as exc:
                self._tools[path] = exc
        found = self._tools[path]
        if isinstance(found, ToolRefused):
            raise found
        return found

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        """The fixed environment a pinned tool runs with, plus `extra`."""
        return {**ENV, **extra}

    def _judge(self, path: str) -> str:
        name = os.path.basename(path)
        unused = f"{name}'s word is not used"
        why = preload_refusal(self._preload)
        if why is not None:
            raise ToolRefused(f"{why}: {unused}")
        real = os.path.realpath(path)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            raise ToolRefused(f"{path} is not installed: {unused}")
        check = self._check
        if check is None:
            raise ToolRefused(f"{real} is not checked against a baseline: {unused}")

        def visit(member: str, data: bytes) -> None:
            why = check(member, data)
            if why is None:
                return
            shown = member if member == real else f"{member} (loaded by {real})"
            hint = (f" (if {name} was upgraded, approve that first: integrity approve "
                    f"{member})" if "differs" in why else "")
            raise ToolRefused(f"{shown} {why}: {unused}{hint}")

        try:
            if self._cache is None:
                self._cache = read_cache()
            closure(real, visit, self._cache)
        except ElfError as exc:
            raise ToolRefused(f"{exc}: {unused}") from None
        try:
            with open(real, "rb") as handle:
                head = handle.read(256)
        except OSError as exc:
            raise ToolRefused(f"cannot read {real}: {exc.strerror}: {unused}") from None
        why = binfmt_refusal(real, head, self._binfmt)
        if why is not None:
            raise ToolRefused(f"{why}: {unused}")
        return real
