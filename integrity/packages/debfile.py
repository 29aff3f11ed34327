"""The signed-archive evidence: apt's package lists and the contents of a cached .deb.

Every stanza of an apt index names the SHA-256 of one .deb, and the index itself is used
only when the SHA256 field of its repository's InRelease gives its (uncompressed)
SHA-256 and that InRelease verifies with gpgv against the keyrings apt trusts, pinned to
the integrity baseline (`aptsig`). A .deb in /var/cache/apt/archives whose SHA-256 such
an index lists is therefore the archive's own package, and its data member says what
each file held, with its mode and owner, independently of dpkg's root-writable database.

A release file vouches only for an install apt can have made from it (`Signed.refusal`):
one whose `Valid-Until` had passed before it is one apt would have refused as expired
(one signed after it is the daily `apt update`'s refresh, and vouches). The install is
dated by dpkg's log, and never earlier than the changed path was last seen as
recorded (the change came after that, whatever the root-writable log says).

Limit: an intruder must now forge the archive's signature or change a baseline-pinned
keyring (which approvals then refuse), or replace gpgv or dpkg-deb or a library they
load, which the baseline pins as well (`pinned`): a tool that is not as the baseline
recorded it gives no verdict. What remains is replay of an older InRelease with its
lists, genuinely signed: one without `Valid-Until` (Debian's stable suite
carries none) vouches for the old versions it lists for ever; one with it, while
it was still valid when the path was last seen as recorded (an intruder who is root
can rewrite dpkg's log to date the install back to then, not before). Removals rest on
dpkg's log, which no signature covers.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import grp
import pwd
import re
import subprocess
import tarfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from integrity.packages.aptsig import KeyringError, Verifier, release_dates, sha256_entries
from integrity.packages.common import Canon
from integrity.packages.pinned import BaselineCheck, PinnedTools, ToolRefused
from integrity.times import iso_epoch

_CHUNK = 1 << 20
_STANZA_FIELD = re.compile(rb"^(Package|Version|Architecture|SHA256):[ \t]*(\S+)", re.M)
_LIST_NAME = re.compile(r"_Packages(\.(gz|xz|bz2|lz4|zst))?$")
_DECOMPRESS = {".gz": gzip.decompress, ".xz": lzma.decompress, ".bz2": bz2.decompress}
DPKG_DEB = "/usr/bin/dpkg-deb"
_APT_HELPER = "/usr/lib/apt/apt-helper"
_CAT = {".lz4": "/usr/bin/lz4cat", ".zst": "/usr/bin/zstdcat"}


class DebError(Exception):
    """A .deb could not be read; the message says why."""


@dataclass(frozen=True)
class Member:
    """One entry of a .deb's data archive, as dpkg would install it."""

    kind: str              # "file", "dir", "symlink" or "other"
    mode: int              # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    sha256: str | None     # regular files (and hard links to them)
    link: bytes | None     # symlink target


@dataclass(frozen=True)
class Signed:
    """The verified release file a package list rests on: its name in the lists
    directory and the signed `Date` and `Valid-Until` (unix times; None when absent)."""

    name: str
    date: float | None
    valid_until: float | None

    def refusal(self, installed: float | None, seen: float | None, label: str) -> str | None:
        """None when apt can have installed `label` from this file; else why not.

        `installed` is when dpkg's log says the install or upgrade of `label` ran (it
        counts whole seconds), `seen` when the path asked about was last seen as the
        baseline records it (the change, hence the install, came after; None: not
        known). Neither known: the install came before now, which is all there is.
        A file signed after the install is no reason to refuse: `apt update` refreshes
        the lists after every install, and a replay is of an older file, not a newer.
        """
        if self.valid_until is None:
            return None
        expired = f"{self.name} expired {iso_epoch(self.valid_until)}"
        if seen is not None and (installed is None or seen > installed):
            if self.valid_until < seen:
                return (f"{expired}, before the change it would explain: the path was "
                        f"last seen as recorded at {iso_epoch(seen)}")
            return None
        if installed is not None:
            if self.valid_until < installed:
                return f"{expired}, before the install of {label} at {iso_epoch(installed)}"
            return None
        if self.valid_until < time.time():
            return (f"{expired}, and dpkg's log records no install of {label} to show "
                    f"it came before")
        return None


class AptLists:
    """SHA-256s of the .debs that apt's package lists name, in lists that their
    InRelease vouches for (see `aptsig`); lists that fail are kept apart, with why.

    Loaded on first use, whole: one pass over ~50 MB of Debian's main index takes about
    a second, which is paid only when a cached .deb is actually there to check.
    `etc` is apt's configuration directory (sources and keyrings) and `check` judges
    each keyring's bytes (None: no keyring is trusted, so no list is); `tools` runs
    gpgv only as the baseline recorded it (by default pinned by the same `check`).
    """

    def __init__(self, lists_dir: str, etc: str = "/etc/apt",
                 check: BaselineCheck | None = None,
                 tools: PinnedTools | None = None) -> None:
        self._dir = lists_dir
        self._etc = etc
        self._check = check
        self._tools = tools if tools is not None else PinnedTools(check)
        #: (Package, Version, Architecture) -> SHA-256 -> the release files vouching.
        self._index: dict[tuple[bytes, bytes, bytes], dict[str, set[Signed]]] | None = None
        #: Stanzas of the lists that failed, by the list's name, and why each failed.
        self._refused_index: dict[tuple[bytes, bytes, bytes], set[str]] = {}
        self._refused: dict[str, str] = {}

    def sha256s(self, name: str, version: str, arch: str) -> set[str]:
        """SHA-256s (hex) verified lists give for one package version; empty when none."""
        return set(self._load().get(_key(name, version, arch), {}))

    def signed_by(self, name: str, version: str, arch: str, sha256: str) -> list[Signed]:
        """The verified release files whose lists give `sha256` for one package version,
        by name; empty when none does."""
        found = self._load().get(_key(name, version, arch), {}).get(sha256, set())
        return sorted(found, key=lambda signed: signed.name)

    def why_unlisted(self, name: str, version: str, arch: str) -> str:
        """Why the lists that name this version were not used ("" when none was
        refused): what a left-open change says about the missing signed evidence."""
        self._load()
        lists = sorted(self._refused_index.get(_key(name, version, arch), set()))
        shown = [self._refused[n] for n in lists[:2]]
        return "; ".join(shown) + (f"; and {len(lists) - 2} more" if len(lists) > 2 else "")

    def _load(self) -> dict[tuple[bytes, bytes, bytes], dict[str, set[Signed]]]:
        if self._index is not None:
            return self._index
        index: dict[tuple[bytes, bytes, bytes], dict[str, set[Signed]]] = {}
        self._index = index
        try:
            names = sorted(os.listdir(self._dir))
        except OSError:
            names = []
        # Repository prefix -> its release file and SHA256 entries, or why it failed
        # (None: not verified yet; each is verified once, when a list first needs it).
        releases: dict[str, tuple[Signed, dict[str, str]] | str | None] = {
            name[:-len(kind)]: None for name in names
            for kind in ("InRelease", "Release") if name.endswith("_" + kind)}
        with Verifier(self._etc, self._check, tools=self._tools) as verifier:
            for name in names:
                if not _LIST_NAME.search(name):
                    continue
                data = _read_list(os.path.join(self._dir, name))
                if data is None:
                    continue
                vouched = self._vouch(name, data, releases, verifier)
                found: dict[tuple[bytes, bytes, bytes], set[str]] = {}
                _index_stanzas(data, found)
                if isinstance(vouched, Signed):
                    for key, shas in found.items():
                        for sha in shas:
                            index.setdefault(key, {}).setdefault(sha, set()).add(vouched)
                    continue
                self._refused[name] = vouched
                for key in found:
                    self._refused_index.setdefault(key, set()).add(name)
        return index

    def _vouch(self, name: str, data: bytes,
               releases: dict[str, tuple[Signed, dict[str, str]] | str | None],
               verifier: Verifier) -> Signed | str:
        """The release file of list `name` (its uncompressed `data`) when it verifies
        and gives its SHA-256; else why not."""
        prefixes = [p for p in releases if name.startswith(p)]
        if not prefixes:
            return f"apt list {name} has no InRelease (nor Release and Release.gpg) beside it"
        prefix = max(prefixes, key=len)
        release = releases[prefix]
        if release is None:
            release = releases[prefix] = self._release(prefix, verifier)
        if isinstance(release, str):
            return release
        signed, entries = release
        stem = _LIST_NAME.sub("_Packages", name)[len(prefix):]
        index_path = urllib.parse.unquote(stem.replace("_", "/"))
        want = entries.get(index_path)
        if want is None:
            return f"apt list {name}: its release file does not list {index_path}"
        if hashlib.sha256(data).hexdigest() != want:
            return f"apt list {name} does not match its InRelease"
        return signed

    def _release(self, prefix: str, verifier: Verifier) -> tuple[Signed, dict[str, str]] | str:
        """A repository's verified InRelease (else its Release with the detached
        Release.gpg) with its SHA256 entries, or why there are none. Its dates are read
        from the signed text alone, like the entries."""
        base = os.path.join(self._dir, prefix)
        try:
            if os.path.lexists(base + "InRelease"):
                release = base + "InRelease"
                with open(release, "rb") as handle:
                    signed = verifier.verify(release, handle.read())
            else:
                release = base + "Release"
                with open(release, "rb") as handle:
                    data = handle.read()
                with open(base + "Release.gpg", "rb") as handle:
                    signature = handle.read()
                signed = verifier.verify(release, data, signature)
        except OSError as exc:
            return f"cannot read {exc.filename}: {exc.strerror}"
        except KeyringError as exc:
            return str(exc)
        name = os.path.basename(release)
        try:
            date, valid_until = release_dates(signed)
        except ValueError as exc:
            return f"{name}: {exc}"
        return Signed(name, date, valid_until), sha256_entries(signed)


def _key(name: str, version: str, arch: str) -> tuple[bytes, bytes, bytes]:
    return name.encode(), version.encode(), arch.encode()


def _read_list(path: str) -> bytes | None:
    """The uncompressed text of one index file, or None when it cannot be read.

    gzip, xz and bzip2 are in the standard library; apt's own lz4 and zstd copies are
    decompressed by apt-helper (which knows every format apt writes) or lz4cat/zstdcat,
    by their fixed paths with a fixed environment. They are not pinned to the baseline
    as gpgv is: what they write out is believed only if its SHA-256 is the one the
    verified InRelease gives, so a lying decompressor can only lose the evidence.
    """
    ext = os.path.splitext(path)[1]
    try:
        if ext not in (".lz4", ".zst"):
            with open(path, "rb") as handle:
                raw = handle.read()
            decompress = _DECOMPRESS.get(ext)
            return decompress(raw) if decompress else raw
        if os.access(_APT_HELPER, os.X_OK):
            command = [_APT_HELPER, "cat-file", path]
        elif os.access(_CAT[ext], os.X_OK):
            command = [_CAT[ext], path]
        else:
            return None
        return subprocess.run(command, capture_output=True, check=True,
                              env=PinnedTools.env(), stdin=subprocess.DEVNULL).stdout
    except (OSError, ValueError, EOFError, lzma.LZMAError, subprocess.SubprocessError):
        return None


def _index_stanzas(data: bytes, index: dict[tuple[bytes, bytes, bytes], set[str]]) -> None:
    """Add every (Package, Version, Architecture) -> SHA256 of an index file."""
    fields: dict[bytes, bytes] = {}

    def flush() -> None:
        try:
            key = (fields[b"Package"], fields[b"Version"], fields[b"Architecture"])
            index.setdefault(key, set()).add(fields[b"SHA256"].decode("ascii").lower())
        except (KeyError, UnicodeDecodeError):
            pass

    for match in _STANZA_FIELD.finditer(data):
        if match.group(1) == b"Package" and fields:
            flush()
            fields = {}
        fields[match.group(1)] = match.group(2)
    if fields:
        flush()


def archive_name(name: str, version: str, arch: str) -> str:
    """The file name apt gives a downloaded .deb (the epoch's colon is escaped)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def sha256_file(handle: IO[bytes]) -> str:
    """SHA-256 (hex) of an open file from its start."""
    handle.seek(0)
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def read_members(handle: IO[bytes], canon: Canon,
                 tools: PinnedTools) -> dict[bytes, Member]:
    """Every entry of an open .deb's data archive, by canonical absolute path.

    The caller opens the file once, checks its SHA-256 and hands the same open file
    here, so what is read is what was checked. gzip/xz/bzip2 data is read in-process;
    anything else (zstd) through `dpkg-deb --fsys-tarfile`, which reads every format dpkg
    installs from: its tar is what the package is said to hold, so only a dpkg-deb
    `tools` vouches for (the baseline's, with its libraries) is run, by its real path.
    """
    offset, size, compression = _data_member(handle)
    if compression in ("", ".gz", ".xz", ".bz2"):
        handle.seek(offset)
        try:
            with tarfile.open(fileobj=_Limited(handle, size),  # type: ignore[call-overload]
                              mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
                return _members(tar, canon)
        except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError) as exc:
            raise DebError(f"corrupt data.tar{compression}: {exc}") from exc
    try:
        dpkg_deb = tools.resolve(DPKG_DEB)
    except ToolRefused as exc:
        raise DebError(str(exc)) from None
    handle.seek(0)
    proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", "/dev/stdin"], stdin=handle,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=tools.env())
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            members = _members(tar, canon)
        proc.stdout.read()
    except tarfile.TarError as exc:
        proc.kill()
        raise DebError(f"dpkg-deb output is not a tar archive: {exc}") from exc
    finally:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise DebError(f"dpkg-deb --fsys-tarfile failed: "
                       f"{err.decode(errors='replace').strip()}")
    return members


def _data_member(handle: IO[bytes]) -> tuple[int, int, str]:
    """(offset, size, compression suffix) of the data.tar member of an ar archive."""
    handle.seek(0)
    if handle.read(8) != b"!<arch>\n":
        raise DebError("not a .deb (no ar header)")
    while True:
        header = handle.read(60)
        if len(header) < 60:
            raise DebError("no data.tar member")
        name = header[:16].rstrip(b" ").rstrip(b"/").decode("ascii", "replace")
        try:
            size = int(header[48:58])
        except ValueError as exc:
            raise DebError("corrupt ar header") from exc
        if name.startswith("data.tar"):
            return handle.tell(), size, name[len("data.tar"):]
        handle.seek(size + (size & 1), os.SEEK_CUR)


def _members(tar: tarfile.TarFile, canon: Canon) -> dict[bytes, Member]:
    members: dict[bytes, Member] = {}
    for info in tar:
        path = canon(_tar_path(info.name))
        uid, gid = _owner(info)
        mode = info.mode & 0o7777
        if info.isreg():
            members[path] = Member("file", mode, uid, gid, _sha256_member(tar, info), None)
        elif info.islnk():
            # A hard link carries no data: it holds what its target holds.
            target = members.get(canon(_tar_path(info.linkname)))
            members[path] = Member("file", mode, uid, gid,
                                   target.sha256 if target else None, None)
        elif info.isdir():
            members[path] = Member("dir", mode, uid, gid, None, None)
        elif info.issym():
            members[path] = Member("symlink", mode, uid, gid, None,
                                   os.fsencode(info.linkname))
        else:
            members[path] = Member("other", mode, uid, gid, None, None)
    return members


def _tar_path(name: str) -> bytes:
    raw = os.fsencode(name)
    while raw.startswith(b"./"):
        raw = raw[2:]
    raw = raw.strip(b"/")
    return b"/" + raw if raw not in (b"", b".") else b"/"


def _owner(info: tarfile.TarInfo) -> tuple[int, int]:
    """uid and gid as dpkg applies them: names that resolve here win over numbers."""
    uid, gid = info.uid, info.gid
    if info.uname:
        try:
            uid = pwd.getpwnam(info.uname).pw_uid
        except KeyError:
            pass
    if info.gname:
        try:
            gid = grp.getgrnam(info.gname).gr_gid
        except KeyError:
            pass
    return uid, gid


def _sha256_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    digest = hashlib.sha256()
    extracted = tar.extractfile(info)
    assert extracted is not None
    for chunk in _chunks(extracted):
        digest.update(chunk)
    return digest.hexdigest()


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(_CHUNK):
        yield chunk


class _Limited:
    """A read-only view of `size` bytes of a file from its current offset."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self._handle = handle
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._handle.read(n)
        self._left -= len(data)
        return data
