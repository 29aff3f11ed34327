"""A signed apt repository in temporary directories, made with real gpg.

`SigningKey` is an OpenPGP key in a private GNUPGHOME (`stop` ends the gpg-agent gpg
starts there); `AptRepo` is apt's configuration
directory (a deb822 sources file whose Signed-By names the key's binary keyring) and its
lists directory, where `publish` writes a Packages index and an InRelease, clearsigned
by gpg, whose SHA256 field lists it: what `apt-get update` leaves behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import lzma
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

URI = "http://deb.example.invalid/debian"
SUITE = "stable"
#: apt's name of the repository's files in its lists directory.
PREFIX = "deb.example.invalid_debian_dists_stable_"


def rfc1123(when: float) -> str:
    """A unix time as apt's release files write dates: "Thu, 03 Dec 2026 10:00:00 UTC"."""
    return time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(when))


@dataclass(frozen=True)
class SigningKey:
    """An ed25519 signing key in its own GNUPGHOME, and its public key exported as a
    binary keyring (what /usr/share/keyrings holds)."""

    home: Path
    keyring: bytes
    #: The digest algorithm signatures are made with.
    digest: str = "SHA256"

    @classmethod
    def generate(cls, home: Path, name: str = "test", algo: str = "ed25519") -> SigningKey:
        home.mkdir(mode=0o700)
        _gpg(home, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.invalid>",
             algo, "sign", "never")
        exported = _gpg(home, "--export")
        assert exported, "gpg exported no key"
        return cls(home, exported)

    def stop(self) -> None:
        """End the gpg-agent gpg started for this home (it would outlive the test)."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       capture_output=True)

    def armored(self) -> bytes:
        """The public key ASCII-armored (what trusted.gpg.d/*.asc holds)."""
        return _gpg(self.home, "--armor", "--export")

    def add_signing_subkey(self) -> SigningKey:
        """This key with a new signing subkey (which gpg then signs with), and its
        public keyring exported again."""
        _gpg(self.home, "--passphrase", "", "--quick-add-key", self.fingerprint,
             "ed25519", "sign", "never")
        return dataclasses.replace(self, keyring=_gpg(self.home, "--export"))

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint (40 hex digits), as Signed-By may name it."""
        listing = _gpg(self.home, "--with-colons", "--fingerprint").decode()
        return next(line.split(":")[9] for line in listing.splitlines()
                    if line.startswith("fpr:"))

    def detach_sign(self, text: bytes) -> bytes:
        """A detached signature of `text`, as Release.gpg is."""
        return _gpg(self.home, "--detach-sign", "--digest-algo", self.digest, text=text)

    def clearsign(self, text: bytes) -> bytes:
        """`text` clearsigned, as an InRelease file is."""
        return _gpg(self.home, "--clearsign", "--digest-algo", self.digest, text=text)


def _gpg(home: Path, *args: str, text: bytes = b"") -> bytes:
    """gpg ARGS in batch mode with `home` as its GNUPGHOME; its output."""
    return subprocess.run(["gpg", "--batch", *args], input=text, check=True,
                          env={**os.environ, "GNUPGHOME": str(home)},
                          capture_output=True).stdout


class AptRepo:
    """apt's configuration (`etc`) and lists (`lists`) for one signed repository."""

    def __init__(self, root: Path, key: SigningKey) -> None:
        self.etc = root / "etc-apt"
        self.lists = root / "lists"
        self.keyring = root / "keyrings" / "test-archive-keyring.gpg"
        for directory in (self.etc / "sources.list.d", self.lists, self.keyring.parent):
            directory.mkdir(parents=True, exist_ok=True)
        self.keyring.write_bytes(key.keyring)
        (self.etc / "sources.list.d" / "test.sources").write_text(
            f"Types: deb\nURIs: {URI}\nSuites: {SUITE}\nComponents: main\n"
            f"Signed-By: {self.keyring}\n")
        self.key = key
        self.packages = self.lists / f"{PREFIX}main_binary-all_Packages"

    def publish(self, stanzas: str, compression: str = "", sign_with: SigningKey | None
                = None, signed: bool = True, **dates: str) -> Path:
        """Write the Packages index (compressed as apt may keep it) and an InRelease
        listing its uncompressed SHA-256 (`dates` as for `release`; `signed` False: the
        bare text, which only a forged gpgv would pass); return the index's path."""
        data = stanzas.encode()
        for old in self.lists.glob(f"{PREFIX}main_binary-all_Packages*"):
            old.unlink()
        path = Path(f"{self.packages}{compression}")
        packed = {"": lambda d: d, ".gz": gzip.compress, ".xz": lzma.compress}
        if compression == ".lz4":
            self.packages.write_bytes(data)
            subprocess.run(["lz4", "-q", "--rm", str(self.packages), str(path)], check=True)
        else:
            path.write_bytes(packed[compression](data))
        self.release([("main/binary-all/Packages", data)], sign_with, signed=signed,
                     **dates)
        return path

    def release(self, indexes: list[tuple[str, bytes]],
                sign_with: SigningKey | None = None, date: str | None = None,
                valid_until: str | None = None, signed: bool = True) -> None:
        """Write the InRelease listing each (index path, uncompressed bytes), signed
        with `date` (default: a day ago, before any install of the test) and, when
        given, `valid_until` (values as the fields hold them: see `rfc1123`); `signed`
        False: the bare text."""
        lines = "".join(f" {hashlib.sha256(d).hexdigest()} {len(d)} {p}\n"
                        for p, d in indexes)
        date = rfc1123(time.time() - 86400) if date is None else date
        until = f"Valid-Until: {valid_until}\n" if valid_until is not None else ""
        text = (f"Origin: test\nSuite: {SUITE}\nDate: {date}\n{until}"
                f"Components: main\nArchitectures: all\nSHA256:\n{lines}").encode()
        self.inrelease.write_bytes((sign_with or self.key).clearsign(text) if signed
                                   else text)
        self.release_text = text

    @property
    def inrelease(self) -> Path:
        return self.lists / f"{PREFIX}InRelease"


#: The tools the signed-archive evidence is read with.
TOOLS = ("/usr/bin/gpgv", "/usr/bin/dpkg-deb")


def tool_files() -> list[str]:
    """Every file of the tools' ELF closures (executables, interpreter, libraries):
    what a baseline must hold for their word to count."""
    from integrity.packages.elfdeps import closure

    return sorted({path for tool in TOOLS for path in closure(tool)})


class Pinned:
    """Keyring bytes, and the bytes of the tools' files, as a baseline covering
    /usr/bin and /usr/lib would record them: `check` accepts exactly those.

    test_packages judges keyrings and tools with this; the approval tests use the real
    baseline (Approver.baseline_check)."""

    def __init__(self, *paths: Path, tools: bool = True) -> None:
        self.digests = {os.path.realpath(p): hashlib.sha256(p.read_bytes()).digest()
                        for p in paths}
        for tool in tool_files() if tools else []:
            self.digests[tool] = hashlib.sha256(Path(tool).read_bytes()).digest()

    def check(self, path: str, data: bytes) -> str | None:
        want = self.digests.get(path)
        if want is None:
            return "not in the integrity baseline (protect it with a rule)"
        if hashlib.sha256(data).digest() != want:
            return "differs from the integrity baseline"
        return None


#: The intruder's gpgv: every signature is good, and the signed text is what it is
#: given (a bare Release text, unsigned).
FAKE_GPGV = b"""#!/bin/sh
out=; prev=; last=
for arg in "$@"; do
    [ "$prev" = --output ] && out="$arg"
    prev="$arg"; last="$arg"
done
[ -n "$out" ] && cat "$last" > "$out"
echo "[GNUPG:] NEWSIG"
echo "[GNUPG:] GOODSIG 0123456789ABCDEF Debian Archive Automatic Signing Key"
echo "[GNUPG:] VALIDSIG 0123456789ABCDEF0123456789ABCDEF01234567 2026-12-03 0 4 0 22 8 00 \
0123456789ABCDEF0123456789ABCDEF01234567"
exit 0
"""


@contextlib.contextmanager
def replaced(path: str, content: bytes, mode: int = 0o755) -> Iterator[None]:
    """The system file `path` replaced by `content` for the block; the original (its
    very inode) put back afterwards, whatever happens. Hold the test packages' lock
    (debs.exclusive) around it: tests of other runs use these tools too."""
    backup = f"{path}.integrity-test-orig"
    if os.path.lexists(backup):  # a run killed inside the block: put it back first
        os.replace(backup, path)
    os.link(path, backup)
    try:
        new = f"{path}.integrity-test-new"
        with open(new, "wb") as handle:
            handle.write(content)
        os.chmod(new, mode)
        os.replace(new, path)
        yield
    finally:
        os.replace(backup, path)
