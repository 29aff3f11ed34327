"""apt's signatures, checked again: which package lists an InRelease vouches for.

apt checks an index against the InRelease it verified before storing it, but what lies
in /var/lib/apt/lists afterwards is only root-writable files. Here each InRelease (or
Release with its detached Release.gpg) is verified again with gpgv against the keyrings
apt trusts (Signed-By of the sources, else trusted.gpg and trusted.gpg.d; Signed-By's
fingerprints restrict which of their keys may sign, checked on gpgv's VALIDSIG), and a
keyring is used only when the caller's `BaselineCheck` accepts its bytes: approval pins
them to the integrity baseline, so a keyring an intruder replaced signs nothing. gpgv
reads private copies of exactly the bytes judged, and only the signed text gpgv writes
out is parsed. gpgv itself is believed only as the baseline recorded it, with every
library it loads (`pinned`): a gpgv that says GOODSIG to anything signs nothing.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from integrity.packages.pinned import BaselineCheck, PinnedTools, ToolRefused

GPGV = "/usr/bin/gpgv"
_ARMOR = re.compile(rb"-----BEGIN PGP PUBLIC KEY BLOCK-----(.*?)-----END PGP PUBLIC KEY "
                    rb"BLOCK-----", re.S)
#: What apt's URItoFileName quotes as %xx, besides control characters and non-ASCII.
_QUOTED = set(b'\\|{}[]<>"^~_=!@#$%&*')
#: OpenPGP hash algorithm ids (RFC 9580) of VALIDSIG's eighth field that apt accepts
#: for a release file: the SHA-2 and SHA-3 families. gpgv itself still takes SHA-1.
_STRONG_HASHES = {"8", "9", "10", "11", "12", "14"}
_HASHES_BY_ID = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}
#: A key fingerprint in Signed-By (v4: 40 hex digits, v5: 64), "!" for that key only.
_FINGERPRINT = re.compile(r"(?:[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})!?")
_BAD_STATUS = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NODATA", "NO_PUBKEY"}
_HASHES = re.compile(rb"^SHA256:[ \t]*\n((?:[ \t]+\S.*\n?)*)", re.M)
#: RFC 1123 as apt reads a Release's dates (RFC1123StrToTime): UTC spelled GMT, UTC, Z
#: or a zero numeric offset; nothing else is accepted.
_RFC1123 = re.compile(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{1,2}) (Jan|Feb|Mar|Apr|May|Jun"
                      r"|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) (\d\d):(\d\d):(\d\d) "
                      r"(?:GMT|UTC|Z|[+-]0000)")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


class KeyringError(Exception):
    """A keyring may not be used; the message says which and why."""


@dataclass(frozen=True)
class Source:
    """One repository of apt's sources: the list-file prefix of its release files and
    the keyrings Signed-By names (empty: apt's global keyrings)."""

    prefix: str
    keyrings: tuple[str, ...]
    #: The sources file a Signed-By key block is written in (inline key), else None.
    inline_in: str | None = None
    #: Fingerprints Signed-By names: only those keys (and their subkeys, unless the
    #: fingerprint ends in "!") may sign, whichever keyrings hold them.
    fingerprints: tuple[str, ...] = ()


def list_prefix(uri: str, suite: str) -> str:
    """The file-name prefix apt gives a repository's lists ("host_path_dists_suite_"):
    apt's URItoFileName of the release directory (scheme and credentials dropped,
    special characters as %xx, "/" as "_")."""
    rest = uri.split("://", 1)[-1]
    host, _, path = rest.partition("/")
    host = host.rsplit("@", 1)[-1]
    base = f"{host}/{path}".rstrip("/") + "/"
    if suite.endswith("/"):
        base += "" if suite == "/" else suite
    else:
        base += f"dists/{suite}/"
    quoted = "".join(f"%{b:02x}" if b in _QUOTED or b <= 0x20 or b >= 0x7f else chr(b)
                     for b in base.encode())
    return quoted.replace("/", "_")


def read_sources(etc: str) -> list[Source]:
    """The repositories of sources.list, sources.list.d/*.list and *.sources under
    `etc` (apt's configuration directory)."""
    found: list[Source] = []
    parts = os.path.join(etc, "sources.list.d")
    try:
        names = sorted(os.listdir(parts))
    except OSError:
        names = []
    files = [os.path.join(etc, "sources.list")] + [
        os.path.join(parts, n) for n in names if n.endswith((".list", ".sources"))]
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            found += _deb822_sources(text, path)
        else:
            found += _one_line_sources(text)
    return found


def _signed_by(value: str, path: str
               ) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
    """(keyring paths, sources file holding an inline key block or None, fingerprints)
    of a Signed-By value. With fingerprints and no keyring, apt's global keyrings are
    used, restricted to those keys (sources.list(5))."""
    if "BEGIN PGP PUBLIC KEY BLOCK" in value:
        return (), path, ()
    words = [v for v in re.split(r"[\s,]+", value) if v]
    # apt refuses a source whose Signed-By holds anything else ("not a fingerprint",
    # e.g. one written in gpg's groups of four): named here, so that no key matches
    # it, rather than dropped, which left apt's global keyrings unrestricted.
    return (tuple(v for v in words if v.startswith("/")), None,
            tuple(v.upper() if _FINGERPRINT.fullmatch(v) else f"(not a fingerprint: {v})"
                  for v in words if not v.startswith("/")))


def _deb822_sources(text: str, path: str) -> list[Source]:
    found = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        name = ""
        for line in stanza.split("\n"):
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and name:
                fields[name] += "\n" + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                fields[name] = value.strip()
        if "deb" not in fields.get("types", "").split() or \
                fields.get("enabled", "yes").lower() == "no":
            continue
        keyrings, inline, fingerprints = _signed_by(fields.get("signed-by", ""), path)
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                found.append(Source(list_prefix(uri, suite), keyrings, inline,
                                    fingerprints))
    return found


def _one_line_sources(text: str) -> list[Source]:
    found = []
    for line in text.split("\n"):
        line = line.split("#", 1)[0].strip()
        if not re.match(r"deb\s", line):
            continue
        options = re.match(r"deb\s+\[([^\]]*)\]\s*(.*)", line)
        words = (options.group(2) if options else line[4:]).split()
        keyrings: tuple[str, ...] = ()
        fingerprints: tuple[str, ...] = ()
        for option in (options.group(1).split() if options else []):
            key, _, value = option.partition("=")
            if key.lower() == "signed-by":
                keyrings, _, fingerprints = _signed_by(value, "")
        if len(words) >= 2:
            found.append(Source(list_prefix(words[0], words[1]), keyrings,
                                fingerprints=fingerprints))
    return found


def dearmor(data: bytes, path: str) -> bytes:
    """The binary packets of every ASCII-armored key block in `data` (gpgv reads
    binary keyrings only); KeyringError when there is none or one is corrupt."""
    blocks = _ARMOR.findall(data)
    if not blocks:
        raise KeyringError(f"keyring {path}: no armored public key block")
    out = b""
    for block in blocks:
        # deb822 continuation lines are indented, and " ." stands for an empty line.
        lines = [b"" if ln.strip() == b"." else ln.strip() for ln in block.split(b"\n")]
        lines = lines[1:] if lines and not lines[0] else lines
        if b"" in lines:  # armor headers end at the first empty line
            lines = lines[lines.index(b"") + 1:]
        body = [ln for ln in lines if ln and not ln.startswith(b"=") and b":" not in ln]
        try:
            out += base64.b64decode(b"".join(body), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyringError(f"keyring {path}: corrupt armor: {exc}") from None
    return out


class Verifier:
    """Verifies release files with gpgv against the keyrings apt trusts, each
    keyring read once, judged by `check`, and handed to gpgv as a private copy;
    gpgv runs only when `tools` (by default pinned by the same `check`) vouches for it.

    Use as a context manager: the private directory is removed on exit.
    """

    def __init__(self, etc: str, check: BaselineCheck | None, gpgv: str = GPGV,
                 tools: PinnedTools | None = None) -> None:
        self._etc = etc
        self._check = check
        self._gpgv = gpgv
        self._tools = tools if tools is not None else PinnedTools(check)
        self._sources: list[Source] | None = None
        self._copies: dict[str, str | KeyringError] = {}
        self._dir: str | None = None

    def __enter__(self) -> Verifier:
        self._dir = tempfile.mkdtemp(prefix="integrity-gpgv-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _global_keyrings(self) -> list[str]:
        parts = os.path.join(self._etc, "trusted.gpg.d")
        try:
            names = sorted(n for n in os.listdir(parts) if n.endswith((".gpg", ".asc")))
        except OSError:
            names = []
        main = os.path.join(self._etc, "trusted.gpg")
        return ([main] if os.path.lexists(main) else []) + [os.path.join(parts, n)
                                                            for n in names]

    def _sources_of(self, release: str) -> list[Source]:
        """The sources a release file of the lists directory belongs to, by its name;
        KeyringError when they disagree on Signed-By (apt refuses that too:
        "Conflicting values set for option Signed-By")."""
        if self._sources is None:
            self._sources = read_sources(self._etc)
        name = os.path.basename(release)
        matching = [s for s in self._sources if name.startswith(s.prefix)
                    and name[len(s.prefix):] in ("InRelease", "Release")]
        if len({(s.keyrings, s.inline_in, s.fingerprints) for s in matching}) > 1:
            raise KeyringError(f"{name}: its sources name different Signed-By values")
        return matching

    def keyrings_for(self, release: str) -> tuple[list[str], str | None]:
        """(keyring paths, sources file holding an inline key or None) apt trusts for
        a release file of the lists directory, by its name."""
        signed = [s for s in self._sources_of(release) if s.keyrings or s.inline_in]
        if signed:
            return (sorted({k for s in signed for k in s.keyrings}),
                    next((s.inline_in for s in signed if s.inline_in), None))
        return self._global_keyrings(), None

    def fingerprints_for(self, release: str) -> set[str]:
        """The keys Signed-By restricts a release file of the lists directory to (by
        fingerprint, "!" for that exact key); empty when it names none."""
        return {f for s in self._sources_of(release) for f in s.fingerprints}

    def _copy(self, path: str, inline: bool = False) -> str:
        """A private copy of a keyring's judged bytes, binary; KeyringError if unusable."""
        assert self._dir is not None, "Verifier is used as a context manager"
        if path not in self._copies:
            try:
                self._copies[path] = self._judged_copy(path, inline)
            except KeyringError as exc:
                self._copies[path] = exc
        copy = self._copies[path]
        if isinstance(copy, KeyringError):
            raise copy
        return copy

    def _judged_copy(self, path: str, inline: bool) -> str:
        assert self._dir is not None
        real = os.path.realpath(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise KeyringError(f"keyring {path}: cannot read: {exc.strerror}") from None
        if self._check is None:
            raise KeyringError(f"keyring {path}: not checked against a baseline")
        why = self._check(real, data)
        if why is not None:
            raise KeyringError(f"keyring {path}: {why}")
        if inline or path.endswith(".asc") or data.lstrip().startswith(b"-----BEGIN"):
            data = dearmor(data, path)
        copy = os.path.join(self._dir, f"keyring-{len(self._copies)}.gpg")
        with open(copy, "xb") as handle:
            handle.write(data)
        return copy

    def verify(self, release: str, data: bytes, signature: bytes | None = None) -> bytes:
        """The signed text of a release file of the lists directory: an InRelease's
        (`data` as read once) as gpgv writes it out, or with a detached `signature`
        (Release.gpg) `data` itself, verified by gpgv with the keyrings apt trusts for
        it; KeyringError naming what failed."""
        assert self._dir is not None, "Verifier is used as a context manager"
        name = os.path.basename(release)
        paths, inline = self.keyrings_for(release)
        copies, refused = [], []
        for path, is_inline in [(p, False) for p in paths] + (
                [(inline, True)] if inline is not None else []):
            try:
                copies.append(self._copy(path, is_inline))
            except KeyringError as exc:
                refused.append(str(exc))
        if not copies:
            why = "; ".join(refused) or "none is named by its source, and apt's " \
                                        "trusted.gpg and trusted.gpg.d hold none"
            raise KeyringError(f"{name}: no trusted keyring ({why})")
        signed, text = (os.path.join(self._dir, n) for n in ("signed", "signed-text"))
        for leftover in (signed, text, signed + ".sig"):
            if os.path.lexists(leftover):
                os.unlink(leftover)
        with open(signed, "xb") as handle:
            handle.write(data)
        try:
            # Its status lines and exit status are the verdict: only a gpgv the
            # baseline vouches for (with its libraries) gives one, run by its real path.
            gpgv = self._tools.resolve(self._gpgv)
        except ToolRefused as exc:
            raise KeyringError(f"{name}: {exc}") from None
        argv = [gpgv, "--status-fd", "1"]
        for copy in copies:
            argv += ["--keyring", copy]
        if signature is None:
            argv += ["--output", text, signed]
        else:
            with open(signed + ".sig", "xb") as handle:
                handle.write(signature)
            argv += [signed + ".sig", signed]
        # An empty home of our own: gpgv would otherwise add ~/.gnupg/trustedkeys.kbx.
        env = self._tools.env(GNUPGHOME=self._dir)
        try:
            proc = subprocess.run(argv, capture_output=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KeyringError(f"{name}: cannot run gpgv: {exc}") from None
        lines = [line.split()[1:] for line in proc.stdout.decode(errors="replace")
                 .splitlines() if line.startswith("[GNUPG:] ") and len(line.split()) > 1]
        status = [words[0] for words in lines]
        bad = sorted(set(status) & _BAD_STATUS)
        if proc.returncode != 0 or bad or "GOODSIG" not in status \
                or "VALIDSIG" not in status:
            detail = ", ".join(bad) or f"gpgv exit status {proc.returncode}"
            note = f"; {'; '.join(refused)}" if refused else ""
            raise KeyringError(f"{name}: bad signature ({detail}){note}")
        validsigs = [words for words in lines if words[0] == "VALIDSIG"]
        weak = sorted({_HASHES_BY_ID.get(w[8], f"hash algorithm {w[8]}") for w in validsigs
                       if len(w) > 8 and w[8] not in _STRONG_HASHES})
        if weak:
            raise KeyringError(f"{name}: signed with a weak digest ({', '.join(weak)}), "
                               "which apt refuses")
        allowed = self.fingerprints_for(release)
        if allowed:
            _named_key(name, validsigs, allowed)
        if signature is not None:
            return data
        with open(text, "rb") as handle:
            return handle.read()


def _named_key(name: str, validsigs: list[list[str]], allowed: set[str]) -> None:
    """KeyringError unless every valid signature is by a key Signed-By names: the
    signing (sub)key's fingerprint is VALIDSIG's first field, its primary key's the
    tenth (gpg's DETAILS); "FPR!" accepts that exact key only, "FPR" its subkeys too."""
    for words in validsigs:
        signing = words[1].upper() if len(words) > 1 else ""
        primary = words[10].upper() if len(words) > 10 else signing
        if f"{signing}!" in allowed or signing in allowed or primary in allowed:
            continue
        named = ", ".join(sorted(allowed))
        raise KeyringError(f"{name}: signed by key {signing or '(unknown)'}, which its "
                           f"source's Signed-By does not name ({named})")


def sha256_entries(signed: bytes) -> dict[str, str]:
    """index path ("main/binary-amd64/Packages") -> SHA-256 of the SHA256 field of a
    Release text (the signed part only)."""
    entries: dict[str, str] = {}
    match = _HASHES.search(signed)
    if match is None:
        return entries
    for line in match.group(1).decode("utf-8", "replace").splitlines():
        words = line.split()
        if len(words) == 3:
            entries[words[2]] = words[0].lower()
    return entries


def release_dates(signed: bytes) -> tuple[float | None, float | None]:
    """(Date, Valid-Until) of a Release text (the signed part only) as unix times, None
    for a field it lacks; ValueError saying which field is unreadable (not the RFC 1123
    date apt writes, or given twice): such a file does not vouch for anything."""
    found: list[float | None] = []
    for name in ("Date", "Valid-Until"):
        # deb822 field names are case-insensitive, as apt reads them.
        values = re.findall(rb"^" + re.escape(name.encode()) + rb":[ \t]*(.*?)[ \t]*$",
                            signed, re.M | re.I)
        if not values:
            found.append(None)
            continue
        if len(values) > 1:
            raise ValueError(f"{name} is given {len(values)} times")
        text = values[0].decode("utf-8", "replace")
        match = _RFC1123.fullmatch(text)
        try:
            if match is None:
                raise ValueError
            _, day, month, year, hour, minute, second = match.groups()
            when = dt.datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hour),
                               int(minute), int(second))
        except ValueError:
            raise ValueError(f"{name} {text!r} is not an RFC 1123 date in UTC") from None
        found.append(float(calendar.timegm(when.timetuple())))
    return found[0], found[1]
