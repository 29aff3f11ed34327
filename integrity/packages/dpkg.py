"""dpkg's view of a path, read straight from its database files.

Everything is parsed from /var/lib/dpkg (no dpkg subprocess per path) and loaded on
first need: the status file and the path index (all ``info/*.list`` files, ~0.1 s for
100k paths) once, the md5sums of a package when one of its files is asked about, and
a cached .deb only when an answer needs it.

Facts of dpkg this relies on (dpkg 1.21):
- info files are named ``name.list`` or ``name:arch.list`` (Multi-Arch: same);
- ``.list`` and ``.md5sums`` name files by their packaged path, before diversion;
  dpkg writes md5sums itself, conffiles included, when a package ships none;
- the ``Conffiles`` field holds the md5 of the conffile as the package shipped it
  (``newconffile`` while not yet recorded), optionally flagged ``obsolete`` or
  ``remove-on-upgrade``; a removed-but-not-purged package keeps its conffiles listed;
- ``updates/NNNN`` holds status stanzas not yet merged into ``status``;
- the log has ``DATE TIME ACTION pkg:arch old new`` lines, in local time, per second.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from integrity.packages.common import (spellings, PACKAGE_DB, SIGNED_ARCHIVE, Canon, LiveError,
                                       LiveFile, Verdict)
from integrity.packages.dpkglog import LogEvent, read_dpkg_log
from integrity.packages.debfile import (AptLists, DebError, Member, Signed, archive_name,
                                        read_members, sha256_file)
from integrity.packages.pinned import PinnedTools

#: States in which a package's files are on disk (config-files keeps only conffiles).
_FILES_PRESENT = {"installed", "unpacked", "half-installed", "half-configured",
                  "triggers-awaited", "triggers-pending"}
_CONFFILE_FLAGS = {b"obsolete", b"remove-on-upgrade"}
_MD5 = re.compile(rb"^[0-9a-f]{32}$")


@dataclass
class _Package:
    """One package of dpkg's status, under the key its info files carry."""

    key: str
    name: str
    arch: str
    version: str
    state: str
    conffiles: dict[bytes, tuple[str, frozenset[bytes]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}".rstrip()


class Dpkg:
    """Answers about paths from one dpkg admin directory (plus apt's cache and log)."""

    name = "dpkg"

    def __init__(self, admindir: str, apt_archives: str, apt_lists: AptLists, log: str,
                 canon: Canon, signed_only: bool = False,
                 tools: PinnedTools | None = None) -> None:
        self._admindir = admindir
        self._archives = apt_archives
        self._apt = apt_lists
        #: Runs dpkg-deb (for .debs Python cannot unpack) only as the baseline has it.
        self._tools = tools if tools is not None else PinnedTools(None)
        #: Prefer the signed archive even where dpkg's list alone answers (directories).
        self._signed_only = signed_only
        self._log = log
        self._canon = canon
        self._packages: dict[str, _Package] | None = None
        self._usable: bool | None = None
        self._owners: dict[bytes, str | list[str]] | None = None
        self._diverted_to: dict[bytes, tuple[bytes, str]] = {}
        self._diverted_from: dict[bytes, tuple[bytes, str]] = {}
        self._diversions_read = False
        self._overrides: dict[bytes, tuple[bytes, bytes, int]] | None = None
        self._md5sums: dict[str, dict[bytes, str]] = {}
        #: Each package's .deb read once: its members (None: unusable, and why) and
        #: the release files whose lists vouch for it, judged per change (`_deb`).
        self._debs: dict[str, tuple[dict[bytes, Member] | None, str, list[Signed]]] = {}
        #: Packages whose .deb is in apt's cache but not vouched for by a verified list.
        self._unverified: set[str] = set()
        self._log_events: list[LogEvent] | None = None

    # -- loading -----------------------------------------------------------------

    def usable(self) -> bool:
        """True when dpkg's status file and info directory can be read."""
        if self._usable is None:
            try:
                self._load_status()
                self._usable = os.path.isdir(os.path.join(self._admindir, "info"))
            except OSError:
                self._usable = False
        return self._usable

    def _load_status(self) -> dict[str, _Package]:
        if self._packages is None:
            packages: dict[str, _Package] = {}
            paths = [os.path.join(self._admindir, "status")]
            updates = os.path.join(self._admindir, "updates")
            try:
                journal = sorted((n for n in os.listdir(updates) if n.isdigit()), key=int)
            except OSError:
                journal = []
            paths += [os.path.join(updates, n) for n in journal]
            for index, path in enumerate(paths):
                try:
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    if index == 0:
                        raise
                    continue  # a journal entry dpkg merged meanwhile
                for stanza in data.split(b"\n\n"):
                    package = self._package(stanza)
                    if package is not None:
                        packages[package.key] = package
            self._packages = packages
        return self._packages

    def _package(self, stanza: bytes) -> _Package | None:
        fields: dict[bytes, bytes] = {}
        name = b""
        for line in stanza.split(b"\n"):
            if line[:1] in (b" ", b"\t"):
                if name:
                    fields[name] += b"\n" + line
            elif b":" in line:
                name, _, value = line.partition(b":")
                fields[name] = value.strip()
        if b"Package" not in fields:
            return None
        pkg = fields[b"Package"].decode()
        arch = fields.get(b"Architecture", b"").decode()
        key = f"{pkg}:{arch}" if fields.get(b"Multi-Arch") == b"same" and arch else pkg
        status = fields.get(b"Status", b"").split()
        package = _Package(key, pkg, arch, fields.get(b"Version", b"").decode(),
                           status[-1].decode() if status else "not-installed")
        for line in fields.get(b"Conffiles", b"").split(b"\n"):
            words = line.split()
            flags = []
            while len(words) > 2 and words[-1] in _CONFFILE_FLAGS:
                flags.append(words.pop())
            if len(words) >= 2:
                # Paths with spaces: the hash is the last word, the path the rest.
                path = line.strip().rsplit(None, 1 + len(flags))[0]
                package.conffiles[self._canon(path)] = (words[-1].decode(), frozenset(flags))
        return package

    def _load_index(self) -> dict[bytes, str | list[str]]:
        """path -> owning package key(s), from every info/*.list, plus diversions."""
        if self._owners is None:
            owners: dict[bytes, str | list[str]] = {}
            canon = self._canon
            for key, data in self._lists():
                for line in data.split(b"\n"):
                    if not line:
                        continue
                    path = canon(line)
                    known = owners.get(path)
                    if known is None:
                        owners[path] = key
                    elif isinstance(known, str):
                        owners[path] = [known, key]
                    else:
                        known.append(key)
            self._owners = owners
            self._load_diversions()
        return self._owners

    def index_under(self, roots: list[bytes]) -> dict[bytes, str]:
        """path -> first owning package, only for paths at or below `roots`: what
        owners(path)[0] says of each, diversions included.

        For recording owners in a baseline: a .list file that names nothing below
        the roots (in any spelling) is skipped after one substring test, so a policy
        over trees no package touches costs one read of dpkg's lists, not a parse.
        """
        below, at = tuple(r + b"/" for r in roots), set(roots)
        self._load_diversions()
        # A diverted path is answered from every package listing its original name
        # (see _locate), so those names are collected whole, wherever they are.
        moved = {t: d for t, d in self._diverted_to.items()
                 if t.startswith(below) or t in at}
        kept = {s: d for s, d in self._diverted_from.items()
                if s.startswith(below) or s in at}
        sources = {source for source, _ in moved.values()} | set(kept)
        listers: dict[bytes, list[str]] = {source: [] for source in sources}
        needles = [s + end for r in roots for s in spellings(r) for end in (b"/", b"\n")]
        needles += [s + b"\n" for source in sources for s in spellings(source)]
        # One C-level test per listed path (a generator per line took half the time:
        # /usr's 126k lines, 0.16-0.21 s of init's main process).
        found: dict[bytes, str] = {}
        canon = self._canon
        for key, data in self._lists():
            if not any(b"\n" + needle in data for needle in needles):
                continue
            for line in data.split(b"\n"):
                if line:
                    path = canon(line)
                    if (path.startswith(below) or path in at) and path not in found:
                        found[path] = key
                    if path in listers:
                        listers[path].append(key)
        for path in [*moved, *kept]:
            located = self._diverted(path, listers.__getitem__)
            if located:
                found[path] = located[0][0]
            else:
                found.pop(path, None)
        return found

    def _lists(self) -> Iterator[tuple[str, bytes]]:
        """(package key, its .list file's bytes with a newline in front) for every
        package, in name order: the order owners() gives a path listed by several."""
        info = os.path.join(self._admindir, "info")
        try:
            listing = sorted(e.name for e in os.scandir(info) if e.name.endswith(".list"))
        except OSError:
            return
        for name in listing:
            try:
                with open(os.path.join(info, name), "rb") as handle:
                    yield name[:-5], b"\n" + handle.read()
            except OSError:
                continue

    def _load_diversions(self) -> None:
        if self._diversions_read:
            return
        self._diversions_read = True
        try:
            with open(os.path.join(self._admindir, "diversions"), "rb") as handle:
                lines = handle.read().split(b"\n")
        except OSError:
            return
        for i in range(0, len(lines) - 2, 3):
            source, target = self._canon(lines[i]), self._canon(lines[i + 1])
            by = lines[i + 2].decode()
            self._diverted_to[target] = (source, by)
            self._diverted_from[source] = (target, by)

    def _statoverride(self, path: bytes) -> tuple[bytes, bytes, int] | None:
        if self._overrides is None:
            self._overrides = {}
            try:
                with open(os.path.join(self._admindir, "statoverride"), "rb") as handle:
                    lines = handle.read().split(b"\n")
            except OSError:
                lines = []
            for line in lines:
                parts = line.split(b" ", 3)
                if len(parts) == 4:
                    try:
                        mode = int(parts[2], 8)
                    except ValueError:
                        continue
                    self._overrides[self._canon(parts[3])] = (parts[0], parts[1], mode)
        return self._overrides.get(path)

    def _md5(self, key: str, path: bytes) -> str | None:
        if key not in self._md5sums:
            sums: dict[bytes, str] = {}
            try:
                with open(os.path.join(self._admindir, "info", key + ".md5sums"),
                          "rb") as handle:
                    lines = handle.read().split(b"\n")
            except OSError:
                lines = []
            for line in lines:
                if len(line) > 34 and line[32:34] in (b"  ", b" *"):
                    sums[self._canon(b"/" + line[34:].lstrip(b"/"))] = line[:32].decode()
            self._md5sums[key] = sums
        return self._md5sums[key].get(path)

    def _deb(self, key: str, seen: float | None) -> tuple[dict[bytes, Member] | None, str]:
        """The verified .deb's members for an installed package, or None and why not.

        The lists that name it vouch only through a release file apt can have installed
        it from (`Signed.refusal`): dated by dpkg's log of the install, and for a change
        made after the path was last seen as recorded at `seen` (unix time; None: not
        known), not before then.
        """
        if key not in self._debs:
            self._debs[key] = self._read_deb(key)
        members, why, releases = self._debs[key]
        if members is None:
            return None, why
        package = self._load_status()[key]
        installed = self._installed_at(package)
        refused = [signed.refusal(installed, seen, package.label) for signed in releases]
        if None in refused:
            return members, ""
        self._unverified.add(key)
        why = "; ".join(str(r) for r in refused)
        return None, (f"apt's verified package lists name {package.label}, but not in a "
                      f"release file apt can have installed it from ({why})")

    def _installed_at(self, package: _Package) -> float | None:
        """When dpkg's log says the run that left `package`'s version installed did it
        (the last install or upgrade to that version), or None when it says nothing."""
        if self._log_events is None:
            self._log_events = read_dpkg_log(self._log)
        for event in reversed(self._log_events):
            if (event.action in ("install", "upgrade") and event.name == package.name
                    and event.version == package.version
                    and event.arch in ("", package.arch)):
                return event.when
        return None

    def _read_deb(self, key: str) -> tuple[dict[bytes, Member] | None, str, list[Signed]]:
        package = self._load_status().get(key)
        if package is None:
            return None, "not in dpkg's status", []
        name = archive_name(package.name, package.version, package.arch)
        path = os.path.join(self._archives, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None, f"no {name} in {self._archives}", []
        with os.fdopen(fd, "rb") as handle:
            try:
                listed = self._apt.sha256s(package.name, package.version, package.arch)
                digest = sha256_file(handle)
                if digest not in listed:
                    refused = self._apt.why_unlisted(package.name, package.version,
                                                     package.arch)
                    why = (f"the SHA-256 of {name} is not in apt's verified package lists"
                           if listed else f"apt's verified package lists do not name "
                           f"{package.label}")
                    self._unverified.add(key)
                    return None, f"{why} ({refused})" if refused else why, []
                releases = self._apt.signed_by(package.name, package.version,
                                               package.arch, digest)
                return read_members(handle, self._canon, self._tools), "", releases
            except (OSError, DebError, EOFError, ValueError) as exc:
                return None, f"cannot read {name}: {exc}", []

    # -- queries -----------------------------------------------------------------

    def _locate(self, path: bytes) -> list[tuple[str, bytes]]:
        """(package key, path as the package names it) for each package installing path.

        A diversion sends the file of every package but the diverting one to another
        name: at the new name the others' file is found under the original name, and at
        the original name only the diverting package's (no one's, for a local one).
        """
        owners = self._load_index()
        return self._diverted(path, lambda listed: _as_list(owners.get(listed)))

    def _diverted(self, path: bytes, listing: Callable[[bytes], list[str]]
                  ) -> list[tuple[str, bytes]]:
        """_locate's answer from `listing` (path -> keys of the packages listing it),
        the diversions applied (loaded by the caller)."""
        if path in self._diverted_to:
            source, by = self._diverted_to[path]
            return [(key, source) for key in listing(source)
                    if by == ":" or key.split(":")[0] != by]
        keys = listing(path)
        if path in self._diverted_from:
            _, by = self._diverted_from[path]
            keys = [key for key in keys if key.split(":")[0] == by]
        return [(key, path) for key in keys]

    def owners(self, path: bytes) -> list[str]:
        """Keys of the packages that install path (already canonical)."""
        return [key for key, _ in self._locate(path)]

    def check_content(self, path: bytes, live: LiveFile, seen: float | None = None) -> Verdict:
        """Compare the live entry with what its package(s) shipped; first match wins
        (signed_only: the first signed-archive match, else the first match). `seen`:
        when the path was last seen as recorded (see `_deb`).

        Directories are listed by hundreds of packages: they are answered from the
        list alone, so no owner's .deb is opened for them unless signed_only asks.
        """
        best: Verdict | None = None
        for key, source in self._locate(path):
            verdict = self._content(key, source, live, seen)
            if verdict.vouched and (not self._signed_only
                                    or verdict.evidence == SIGNED_ARCHIVE):
                return verdict
            if best is None or verdict.vouched and not best.vouched:
                best = verdict
        assert best is not None, "check_content is only asked about owned paths"
        return best

    def unsigned_why(self, key: str, seen: float | None = None) -> str:
        """Why no verified .deb of package `key` is at hand ("" when one is)."""
        return self._deb(key, seen)[1]

    def _content(self, key: str, source: bytes, live: LiveFile,
                 seen: float | None) -> Verdict:
        package = self._load_status().get(key)
        if package is None:
            return Verdict(False, f"listed by {key}, which dpkg's status does not know",
                           None, key)
        label = package.label
        conffile = package.conffiles.get(source)
        if package.state not in _FILES_PRESENT:
            # config-files: dpkg keeps a removed package's conffiles, and writes none
            # until the package is installed again (recreated by hand, it stays open).
            what = "; dpkg writes no conffile of it" if conffile is not None else ""
            return Verdict(False, f"{label} is not installed ({package.state}){what}",
                           None, key)
        try:
            kind = live.kind()
            if kind == "dir":
                # dpkg records a digest for each regular file it ships: a directory
                # there replaced the package's file.
                if conffile is not None or self._md5(key, source) is not None:
                    return Verdict(False, f"a directory where {label} ships a file",
                                   None, key)
                if self._signed_only:
                    members, _ = self._deb(key, seen)
                    member = members.get(source) if members else None
                    if member is not None and member.kind == "dir":
                        return Verdict(True, f"directory in the verified .deb of {label}",
                                       SIGNED_ARCHIVE, key)
                return Verdict(True, f"directory listed by {label}", PACKAGE_DB, key)
            members, why_not = self._deb(key, seen)
            member = members.get(source) if members else None
            if kind == "symlink":
                if member is None or member.kind != "symlink":
                    return Verdict(False, f"package does not state symlink targets "
                                   f"({label}: {why_not or 'not a symlink in its .deb'})",
                                   None, key)
                if live.readlink() == member.link:
                    return Verdict(True, f"link matches the verified .deb of {label}",
                                   SIGNED_ARCHIVE, key)
                return Verdict(False, f"link target differs from what dpkg shipped "
                               f"({label}, verified .deb)", None, key)
            if kind != "file":
                return Verdict(False, f"dpkg records no content for this {kind} "
                               f"({label})", None, key)
            recorded = self._recorded_md5(package, source, conffile)
            if member is not None and member.kind == "file" and member.sha256:
                if live.digest("sha256") == member.sha256:
                    return Verdict(True, f"matches the verified .deb of {label}",
                                   SIGNED_ARCHIVE, key)
                note = ("; dpkg's own record matches the live file, so dpkg's database "
                        "disagrees with the package" if isinstance(recorded, tuple)
                        and live.digest("md5") == recorded[0] else "")
                return Verdict(False, f"content differs from what dpkg shipped ({label}, "
                               f"verified .deb){note}", None, key)
            if isinstance(recorded, str):
                return Verdict(False, recorded, None, key)
            expected, source_name = recorded
            if live.digest("md5") == expected:
                return Verdict(True, f"matches {label} ({source_name})", PACKAGE_DB, key)
        except LiveError as exc:
            return Verdict(False, str(exc), None, key)
        what = ", conffile changed locally" if conffile else ""
        # A .deb was at hand but not vouched for: say why it could not decide instead.
        unused = f"; its cached .deb is not used: {why_not}" \
            if key in self._unverified and members is None else ""
        return Verdict(False, f"content differs from what dpkg shipped ({label}{what})"
                       f"{unused}", None, key)

    def _recorded_md5(self, package: _Package, source: bytes,
                      conffile: tuple[str, frozenset[bytes]] | None) -> tuple[str, str] | str:
        """(md5, where it is recorded) for a file, or why dpkg records none."""
        if conffile is not None:
            digest, flags = conffile
            if b"obsolete" in flags:
                return f"obsolete conffile: {package.label} no longer ships it"
            if not _MD5.match(digest.encode()):
                return (f"dpkg has not recorded this conffile's hash yet "
                        f"({package.label}: {digest!r})")
            return digest, "conffile hash"
        digest_or_none = self._md5(package.key, source)
        if digest_or_none is None:
            return f"{package.label} records no digest for this file"
        return digest_or_none, "dpkg md5sums"

    def check_attributes(self, path: bytes, mode: int, uid: int, gid: int,
                         seen: float | None = None) -> Verdict:
        """Compare mode/uid/gid with a statoverride entry, else with the verified .deb
        (`seen`: when the path was last seen as recorded, see `_deb`).

        The first owner whose verified .deb holds the path decides: packages sharing a
        path (directories, Multi-Arch: same files) ship it alike, and reading one .deb
        per owner of /usr/bin would read hundreds.
        """
        located = self._locate(path)
        key = located[0][0]
        override = self._statoverride(path)
        if override is not None:
            # dpkg applies an override instead of the package's own attributes.
            user, group, want_mode = override
            want_uid, want_gid = _resolve(user, pwd.getpwnam), _resolve(group, grp.getgrnam)
            stated = f"{user.decode()} {group.decode()} {want_mode:04o}"
            if (want_mode, want_uid, want_gid) == (mode, uid, gid):
                return Verdict(True, f"matches dpkg-statoverride ({stated})", PACKAGE_DB,
                               key)
            return Verdict(False, f"differs from dpkg-statoverride ({stated})", None, key)
        missing = []
        for key, source in located:
            package = self._load_status().get(key)
            label = package.label if package else key
            members, why_not = self._deb(key, seen)
            member = members.get(source) if members else None
            if member is None:
                missing.append(f"{label}: {why_not or 'not in its verified .deb'}")
                continue
            diffs = [f"{name} {have} (package: {want})" for name, have, want in (
                ("mode", f"{mode:04o}", f"{member.mode:04o}"), ("uid", uid, member.uid),
                ("gid", gid, member.gid)) if have != want]
            if not diffs:
                return Verdict(True, f"attributes match the verified .deb of {label}",
                               SIGNED_ARCHIVE, key)
            verb = "differ" if len(diffs) > 1 else "differs"
            return Verdict(False, f"{', '.join(diffs)} {verb} from what dpkg shipped "
                           f"({label}, verified .deb)", None, key)
        more = f"; and {len(missing) - 2} more" if len(missing) > 2 else ""
        return Verdict(False, f"package does not state file attributes "
                       f"({'; '.join(missing[:2])}{more}; no dpkg-statoverride entry)",
                       None, located[0][0], unstated=True)

    def removals_since(self, since: float) -> list[tuple[str, str]]:
        """(package name, description) of dpkg's remove/purge/upgrade actions logged
        after `since`, oldest first."""
        return self.logged_since(since, ("remove", "purge", "upgrade"))

    def logged_since(self, since: float, actions: tuple[str, ...]) -> list[tuple[str, str]]:
        """(package name, description) of dpkg's `actions` ("install", "upgrade",
        "remove", "purge") logged after `since`, oldest first."""
        if self._log_events is None:
            self._log_events = read_dpkg_log(self._log)
        # The log counts whole seconds: an action in the baseline's second may follow it.
        return [(event.name, event.text) for event in self._log_events
                if event.when + 1 > since and event.action in actions]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _resolve(name: bytes, lookup: object) -> int | None:
    """A statoverride owner ("root" or "#0") as a number; None when unknown here."""
    if name.startswith(b"#"):
        return int(name[1:]) if name[1:].isdigit() else None
    try:
        entry = lookup(name.decode())  # type: ignore[operator]
    except (KeyError, UnicodeDecodeError):
        return None
    return int(entry[2])
