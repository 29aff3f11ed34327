"""rpm's view of a path, from two `rpm -qa --qf` queries per instance.

rpm states per file a digest (algorithm per package header: md5 on old packages,
sha256 on current ones), mode, owner and group, flags (%config, %ghost) and link target,
so content, attributes and symlinks can all be vouched at "package-db" level. rpm keeps
no log of erased packages; a removal is explained only by a package installed or
upgraded after the baseline.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass

from integrity.packages.common import PACKAGE_DB, Canon, LiveError, LiveFile, Verdict

_ALGORITHMS = {"1": "md5", "2": "sha1", "8": "sha256", "9": "sha384", "10": "sha512",
               "11": "sha224", "(none)": "md5"}
_CONFIG, _GHOST = 1 << 0, 1 << 6
_QUERY = ("[%{FILENAMES}\t%{FILEDIGESTS}\t%{FILEMODES}\t%{FILEUSERNAME}\t"
          "%{FILEGROUPNAME}\t%{FILEFLAGS}\t%{FILELINKTOS}\t%{=NAME}\t%{=ARCH}\t"
          "%{=EPOCHNUM}:%{=VERSION}-%{=RELEASE}\t%{=FILEDIGESTALGO}\n]")


@dataclass(frozen=True)
class _RpmFile:
    key: str        # name:arch
    label: str      # name version-release
    digest: str
    algorithm: str
    mode: int       # full st_mode as rpm states it
    user: str
    group: str
    flags: int
    link: bytes


class Rpm:
    """Answers about paths from rpm's database (the default one, or `dbpath`)."""

    name = "rpm"

    def __init__(self, command: str, dbpath: str | None, canon: Canon) -> None:
        self._command = command
        self._dbpath = dbpath
        self._canon = canon
        self._files: dict[bytes, list[_RpmFile]] | None = None
        self._usable: bool | None = None
        self._installs: list[tuple[float, str, str]] | None = None

    def _query(self, fmt: str) -> bytes:
        command = [self._command]
        if self._dbpath:
            command += ["--dbpath", self._dbpath]
        env = dict(os.environ, LC_ALL="C")
        return subprocess.run([*command, "-qa", "--qf", fmt], capture_output=True,
                              check=True, env=env).stdout

    def usable(self) -> bool:
        """True when rpm is installed and its database holds at least one package."""
        if self._usable is None:
            self._usable = False
            if shutil.which(self._command):
                try:
                    self._usable = bool(self._query("%{NAME}\n").strip())
                except (OSError, subprocess.SubprocessError):
                    pass
        return self._usable

    def _index(self) -> dict[bytes, list[_RpmFile]]:
        if self._files is None:
            self._files = {}
            for line in self._query(_QUERY).split(b"\n"):
                parts = line.split(b"\t")
                if len(parts) != 11:
                    continue  # a name with a tab or newline in it: not ours to guess
                (path, digest, mode, user, group, flags, link, name, arch, evr,
                 algo) = parts
                version = evr.decode(errors="replace").removeprefix("0:")
                record = _RpmFile(
                    f"{name.decode()}:{arch.decode()}", f"{name.decode()} {version}",
                    digest.decode().lower(), _ALGORITHMS.get(algo.decode(), "md5"),
                    int(mode) & 0xFFFF, user.decode(), group.decode(), int(flags), link)
                self._files.setdefault(self._canon(path), []).append(record)
        return self._files

    def owners(self, path: bytes) -> list[str]:
        """Keys ("name:arch") of the packages that own path (already canonical)."""
        return [record.key for record in self._index().get(path, [])]

    def check_content(self, path: bytes, live: LiveFile, seen: float | None = None) -> Verdict:
        """Compare the live entry with rpm's recorded digest or link target (`seen`
        dates signed evidence, of which rpm gives none)."""
        verdicts = [self._content(record, live) for record in self._index()[path]]
        return next((v for v in verdicts if v.vouched), verdicts[0])

    def _content(self, record: _RpmFile, live: LiveFile) -> Verdict:
        key, label = record.key, record.label
        try:
            kind = live.kind()
            if kind == "dir":
                if not stat.S_ISDIR(record.mode):
                    return Verdict(False, f"a directory where {label} ships a "
                                   f"{'symlink' if stat.S_ISLNK(record.mode) else 'file'}",
                                   None, key)
                return Verdict(True, f"directory listed by {label}", PACKAGE_DB, key)
            if kind == "symlink":
                if live.readlink() == record.link:
                    return Verdict(True, f"link matches {label} (rpm)", PACKAGE_DB, key)
                return Verdict(False, f"link target differs from what rpm shipped "
                               f"({label})", None, key)
            if record.flags & _GHOST or not record.digest:
                return Verdict(False, f"{label} records no digest for this file "
                               f"(%ghost or not a regular file)", None, key)
            if live.digest(record.algorithm) == record.digest:
                return Verdict(True, f"matches {label} (rpm {record.algorithm})",
                               PACKAGE_DB, key)
        except LiveError as exc:
            return Verdict(False, str(exc), None, key)
        what = ", config file changed locally" if record.flags & _CONFIG else ""
        return Verdict(False, f"content differs from what rpm shipped ({label}{what})",
                       None, key)

    def check_attributes(self, path: bytes, mode: int, uid: int, gid: int,
                         seen: float | None = None) -> Verdict:
        """Compare mode/owner/group with what rpm's header states."""
        verdicts = []
        for record in self._index()[path]:
            want_uid = _lookup(record.user, pwd.getpwnam)
            want_gid = _lookup(record.group, grp.getgrnam)
            want_mode = record.mode & 0o7777
            diffs = [f"{name} {have} (package: {want})" for name, have, want in (
                ("mode", f"{mode:04o}", f"{want_mode:04o}"),
                ("uid", uid, want_uid if want_uid is not None else record.user),
                ("gid", gid, want_gid if want_gid is not None else record.group))
                if have != want]
            if not diffs:
                return Verdict(True, f"attributes match {record.label} (rpm)", PACKAGE_DB,
                               record.key)
            verb = "differ" if len(diffs) > 1 else "differs"
            verdicts.append(Verdict(False, f"{', '.join(diffs)} {verb} from what rpm "
                                    f"shipped ({record.label})", None, record.key))
        return verdicts[0]

    def unsigned_why(self, key: str, seen: float | None = None) -> str:
        """Why no signed archive vouches for an rpm package: none is checked here."""
        return "rpm's package signatures are not checked here"

    def removals_since(self, since: float) -> list[tuple[str, str]]:
        """(name, description) of packages rpm installed or upgraded after `since`
        (erasures leave no trace in rpm's database)."""
        if self._installs is None:
            self._installs = []
            for line in self._query("%{INSTALLTIME} %{NAME} %{NAME}-%{VERSION}-%{RELEASE}"
                                    ".%{ARCH}\n").decode(errors="replace").splitlines():
                stamp, name, nevra = (line.split(" ", 2) + ["", ""])[:3]
                if stamp.isdigit():
                    self._installs.append((float(stamp), name, nevra))
            self._installs.sort()
        return [(name, f"rpm installed {nevra} at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}")
                for when, name, nevra in self._installs if when + 1 > since]


def _lookup(name: str, lookup: object) -> int | None:
    try:
        return int(lookup(name)[2])  # type: ignore[operator]
    except (KeyError, TypeError):
        return None
