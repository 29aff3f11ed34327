"""What the package managers vouch for: is a changed path explained by a package?

`integrity approve --package-updates` asks this module, path by path, whether the
package manager's own records explain a change. The answer is a `Verdict` that says
yes or no, why, and on what evidence:

- ``signed-archive``: the owning package's ``.deb`` is still in apt's archive cache and
  its SHA-256 is listed in an apt package list whose SHA-256 its InRelease gives, that
  InRelease verified here by gpgv with apt's keyrings as the integrity baseline
  recorded them (see `aptsig`), signed before the package's install and not expired
  by then (see `debfile`). The file is compared with the ``.deb``'s own data, so
  editing dpkg's root-writable md5sums, apt's lists or keyrings cannot launder a change.
  The tools behind it (gpgv, dpkg-deb) and every library they load must be as the
  baseline recorded them too (see `pinned`), or their word counts for nothing.
- ``package-db``: dpkg's md5sums / conffile hashes, dpkg-statoverride, dpkg's log, or
  rpm's header digests. Good enough against accidents, not against someone who is root.
  With ``require_signed`` it vouches for no content, link or attribute (removals still
  rest on dpkg's log).

This is a pure query API: no database, no click, nothing printed. File content is
only ever digested. One `PackageManagers` instance loads each piece of package data
lazily and at most once, so approving thousands of paths costs a few file parses, not a
subprocess per path. The data is a snapshot: make a new instance after dpkg runs.
An instance is not thread-safe.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Protocol

from integrity.packages.common import (PACKAGE_DB, SIGNED_ARCHIVE, LiveFile, Verdict,
                                       canonicalizer)
from integrity.packages.debfile import AptLists
from integrity.packages.dpkg import Dpkg
from integrity.packages.pinned import BaselineCheck, PinnedTools
from integrity.packages.rpm import Rpm

__all__ = ["BaselineCheck", "LiveFile", "PackageManagers", "Verdict", "SIGNED_ARCHIVE",
           "PACKAGE_DB"]

NOT_OWNED = "not owned by any package"
#: What a change only a package database vouches for lacks under require_signed, and
#: (for dpkg) how to have the signed archive at hand next time.
_NEED_SIGNED = "and --require-signed asks for the signed archive"
_KEEP_DEBS = " (keep downloaded .debs: APT::Keep-Downloaded-Packages)"


class Backend(Protocol):
    """What each package manager (dpkg, rpm) answers; see `Dpkg` for the semantics."""

    name: str

    def usable(self) -> bool: ...
    def owners(self, path: bytes) -> list[str]: ...
    def check_content(self, path: bytes, live: LiveFile,
                      seen: float | None = None) -> Verdict: ...
    def check_attributes(self, path: bytes, mode: int, uid: int, gid: int,
                         seen: float | None = None) -> Verdict: ...
    def unsigned_why(self, key: str, seen: float | None = None) -> str: ...
    def removals_since(self, since: float) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class _Unavailable:
    """Why no package manager could be asked (kept for the verdict's reason)."""

    why: str


class PackageManagers:
    """The package managers of this host, asked about one path at a time.

    The defaults are dpkg's and apt's standard locations; tests and operators checking
    another tree point them elsewhere. ``apt_etc`` holds apt's sources and keyrings;
    ``baseline_check`` judges the bytes of each keyring and of each file of the tools
    the signed archive is read with (approval pins them to the baseline; None trusts
    none, so nothing is signed-archive). One instance checks each tool once.
    ``require_signed``: only the signed archive vouches for content, links and
    attributes. ``rpm`` is the rpm
    command (None disables rpm) and ``rpm_dbpath`` an alternative rpm database.
    """

    def __init__(self, admindir: str = "/var/lib/dpkg",
                 apt_archives: str = "/var/cache/apt/archives",
                 apt_lists: str = "/var/lib/apt/lists",
                 dpkg_log: str = "/var/log/dpkg.log",
                 rpm: str | None = "rpm", rpm_dbpath: str | None = None, *,
                 apt_etc: str = "/etc/apt", baseline_check: BaselineCheck | None = None,
                 require_signed: bool = False) -> None:
        canon = canonicalizer()
        tools = PinnedTools(baseline_check)
        lists = AptLists(apt_lists, apt_etc, baseline_check, tools)
        self._backends: list[Backend] = [
            Dpkg(admindir, apt_archives, lists, dpkg_log, canon, require_signed, tools)]
        if rpm is not None:
            self._backends.append(Rpm(rpm, rpm_dbpath, canon))
        self._canon = canon
        self._admindir = admindir
        self.require_signed = require_signed

    def available(self) -> list[str]:
        """Names of the package managers that have a usable database, e.g. ["dpkg"]."""
        return [backend.name for backend in self._backends if backend.usable()]

    def _usable(self) -> list[Backend] | _Unavailable:
        usable = [backend for backend in self._backends if backend.usable()]
        if usable:
            return usable
        return _Unavailable(f"no package manager available (dpkg database not found "
                            f"or unreadable at {self._admindir}, no rpm database)")

    def _owner(self, path: bytes) -> tuple[Backend, list[str]] | _Unavailable | None:
        """The first package manager that lists path, with the owning packages."""
        backends = self._usable()
        if isinstance(backends, _Unavailable):
            return backends
        canonical = self._canon(path)
        for backend in backends:
            owners = backend.owners(canonical)
            if owners:
                return backend, owners
        return None

    def owners(self, path: bytes) -> list[str]:
        """Packages ("name" or "name:arch") that install path; empty when none do."""
        found = self._owner(path)
        return found[1] if isinstance(found, tuple) else []

    def owner_map(self, roots: list[bytes]) -> dict[bytes, str]:
        """path -> installing package for every package file at or below `roots`:
        what a baseline records for its entries (empty without a package manager)."""
        backends = self._usable()
        if isinstance(backends, _Unavailable):
            return {}
        found: dict[bytes, str] = {}
        canonical = [self._canon(r) for r in roots]
        for backend in backends:
            if isinstance(backend, Dpkg):
                part = backend.index_under(canonical)
            else:
                part = {}
                for path in getattr(backend, "_index")():
                    if any(path == r or path.startswith(r + b"/") for r in canonical):
                        owners = backend.owners(path)
                        if owners:
                            part[path] = owners[0]
            if not found:
                found = part  # the first backend's answer, as it is
                continue
            for path, key in part.items():
                found.setdefault(path, key)
        return found

    def canonical(self, path: bytes) -> bytes:
        """path spelled through the top-level directory symlinks, as lookups want it."""
        return self._canon(path)

    def owner(self, path: bytes) -> str | None:
        """The first package that installs path, or None (also when no package
        manager is usable): what a baseline records for each entry."""
        found = self._owner(path)
        return found[1][0] if isinstance(found, tuple) and found[1] else None

    @property
    def admindir(self) -> str:
        """dpkg's admin directory these answers come from."""
        return self._admindir

    def check_content(self, path: bytes, live: LiveFile | None = None,
                      seen: float | None = None) -> Verdict:
        """Does the live entry at path (modified or added) match what its package shipped?

        Regular files are compared by digest; a directory is vouched when a package
        lists it; a symlink only where the package's archive states its target.
        `live` is the entry as already read (its bytes judged, not a second read).
        `seen` is when the path was last seen as the baseline records it (unix time;
        None: not known): the change came after, so a release file that had expired
        by then vouches for nothing of it (see `debfile.Signed`).
        """
        found = self._owner(path)
        if isinstance(found, _Unavailable):
            return Verdict(False, found.why)
        if found is None:
            return Verdict(False, NOT_OWNED)
        backend, _ = found
        return self._signed(backend, backend.check_content(
            self._canon(path), live or LiveFile(path), seen), seen)

    def check_attributes(self, path: bytes, mode: int, uid: int, gid: int,
                         seen: float | None = None) -> Verdict:
        """Is an attribute-only change (mode bits incl. setuid, owner, group) explained?

        Only where the package states attributes: a verified .deb, a statoverride
        entry, or rpm's header. dpkg's database alone does not, so it cannot vouch.
        `seen` as for check_content.
        """
        found = self._owner(path)
        if isinstance(found, _Unavailable):
            return Verdict(False, found.why)
        if found is None:
            return Verdict(False, NOT_OWNED)
        backend, _ = found
        return self._signed(backend, backend.check_attributes(
            self._canon(path), stat.S_IMODE(mode), uid, gid, seen), seen)

    def _signed(self, backend: Backend, verdict: Verdict, seen: float | None) -> Verdict:
        """The verdict, or with require_signed and weaker evidence, a refusal that
        says why no signed archive was at hand."""
        if not self.require_signed or not verdict.vouched \
                or verdict.evidence == SIGNED_ARCHIVE:
            return verdict
        why = backend.unsigned_why(verdict.package, seen) if verdict.package else ""
        hint = _KEEP_DEBS if isinstance(backend, Dpkg) else ""
        return Verdict(False, f"only {backend.name}'s database vouches for it "
                       f"({verdict.reason}{'; ' + why if why else ''}), {_NEED_SIGNED}"
                       f"{hint}", None, verdict.package)

    def dpkg_logged_since(self, since: float,
                          actions: tuple[str, ...]) -> list[tuple[str, str]]:
        """(package name, description) of what dpkg's log records of `actions`
        ("install", "upgrade", "remove", "purge") after unix time `since`, oldest first:
        what a package run since the baseline did. Empty without dpkg."""
        backends = self._usable()
        if isinstance(backends, _Unavailable):
            return []
        return [event for backend in backends if isinstance(backend, Dpkg)
                for event in backend.logged_since(since, actions)]

    def check_removed(self, path: bytes, since: float, owner: str | None) -> Verdict:
        """Is the disappearance of path (present at unix time `since`) explained?

        `owner` is the package that installed the path when the baseline was taken.
        Yes only when that package was removed, purged or upgraded after `since` and
        no installed package lists the path any more: a package manager removes only
        what its packages shipped, so an unowned file's removal is never explained.
        """
        backends = self._usable()
        if isinstance(backends, _Unavailable):
            return Verdict(False, backends.why)
        canonical = self._canon(path)
        for backend in backends:
            owners = backend.owners(canonical)
            if owners:
                return Verdict(False, f"still listed by package {owners[0]}: its removal "
                               f"is not explained", None, owners[0])
        if owner is None:
            return Verdict(False, f"{NOT_OWNED} when the baseline was taken: its removal "
                           "is not explained by a package")
        name = owner.split(":", 1)[0]
        events = [text for backend in backends
                  for pkg, text in backend.removals_since(since) if pkg == name]
        if not events:
            return Verdict(False, f"owned by {owner} when the baseline was taken, but "
                           f"{owner} was neither removed nor upgraded since", None, owner)
        shown = ", ".join(events[:3]) + (f" and {len(events) - 3} more"
                                          if len(events) > 3 else "")
        return Verdict(True, f"{owner} no longer ships it: {shown}", PACKAGE_DB, owner)

