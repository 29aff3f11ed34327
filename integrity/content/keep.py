"""What a baseline keeps of a file: its text, its text with credentials redacted, or
nothing (a secret, a binary, too large), and the reason."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

import blake3

from integrity.errors import IntegrityError
from integrity.policy import Excludes
from integrity.policy.content import ContentPolicy
from integrity.scan.hasher import FileChanged, open_at, read_recent, recent_since
from integrity.scan.walker import open_parent

#: A private key, whatever file holds it (PEM, OpenSSH, PGP armour, an age identity,
#: a PuTTY key), or password hashes in crypt(3) form as shadow files hold them
#: (`user:$6$salt$hash:`), Apache's MD5 and {SHA} among them (htpasswd).
SECRET_CONTENT = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
                            rb"|AGE-SECRET-KEY-1|PuTTY-User-Key-File-\d+:"
                            rb"|:\$(?:1|2[aby]?|5|6|7|y|gy|sha1|md5|apr1)\$[^:\n]{8,}"
                            rb"|:\{S?SHA\}[A-Za-z0-9+/=]{20,}")
SECRET, BINARY, TOO_LARGE = "secret", "binary", "too large"
#: What `redact` puts in place of a value.
_TAG = re.compile(r"<redacted:[0-9a-f]{8}>")
#: The first block a NUL in which makes a file binary.
_BLOCK = 8192


@dataclass(frozen=True)
class Kept:
    """The text a baseline stores for a file, and whether values were redacted."""

    text: bytes
    digest: bytes
    redacted: bool


class Keeper:
    """Decides and prepares what is kept, for one policy and one redaction key."""

    def __init__(self, policy: ContentPolicy, redaction_key: bytes) -> None:
        self.policy = policy
        self.secrets = Excludes.compile(policy.secrets)
        self.key = redaction_key

    def is_secret_path(self, path: bytes) -> bool:
        """A path the `secret` globs name: never read for keeping."""
        return self.secrets.match(path, path.rsplit(b"/", 1)[-1])

    def keep(self, path: bytes, data: bytes) -> Kept | str:
        """What to store of `data`, or why nothing: SECRET, BINARY or TOO_LARGE."""
        if self.is_secret_path(path) or SECRET_CONTENT.search(data):
            return SECRET
        if len(data) > self.policy.max_diff_size:
            return TOO_LARGE
        if b"\0" in data[:_BLOCK]:
            return BINARY
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return BINARY
        redacted = self.redact(text)
        stored = redacted.encode("utf-8")
        return Kept(stored, blake3.blake3(stored).digest(), redacted != text)

    def rekept(self, stored: bytes) -> bytes:
        """A kept text redacted by today's patterns, as a diff's baseline side: a
        pattern added since it was kept must hide its values there too (tags already
        in it stay as they are)."""
        return self.redact(stored.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape")

    def redact(self, text: str) -> str:
        """The text with every credential value replaced by a tag: `<redacted:1a2b3c4d>`.

        The tag is a keyed digest of the value (the key lives outside the database),
        so a changed password shows as a changed line while neither the value nor
        anything that can be tested against it offline is stored or shown.
        """
        for pattern in self.policy.redact:
            text = pattern.sub(self._tag, text)
        return text

    def _tag(self, match: re.Match[str]) -> str:
        value = match.group("value")
        if _TAG.fullmatch(value):
            return match.group(0)  # redacted already: a text redacted again is the same
        digest = blake3.blake3(value.encode("utf-8", "surrogateescape"), key=self.key)
        start, end = match.span("value")
        whole = match.group(0)
        offset = match.start(0)
        return (whole[:start - offset] + f"<redacted:{digest.hexdigest()[:8]}>"
                + whole[end - offset:])


def redaction_key(path: str) -> bytes:
    """The host's redaction key (32 random bytes, 0600), created on first use. It is
    kept beside the database, never in it: a copy of the database alone reveals
    nothing about a redacted value."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot create the redaction key: {exc.strerror}") \
            from None
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
            handle.flush()
            os.fsync(handle.fileno())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            key = handle.read(64)
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read the redaction key: {exc.strerror}") \
            from None
    if len(key) != 32:
        raise IntegrityError(f"{path}: not a redaction key (32 bytes expected)")
    return key


def read_live(path: bytes, top: bytes, limit: int) -> bytes | None:
    """A regular file's bytes, read without following links from its rule's root
    `top` (a path swapped for a link to a secret is never read), settled and read
    twice if it changed in the last seconds; None when it is gone, not a regular file,
    larger than `limit` or keeps changing."""
    try:
        dir_fd, name = open_parent(path, top)
    except OSError:
        return None
    try:
        fd = open_at(name, dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        if st.st_ctime_ns >= recent_since():
            return read_recent(fd, st.st_size)
        data = os.pread(fd, st.st_size + 1, 0)
        return data if len(data) == st.st_size else None
    except (OSError, FileChanged):
        return None
    finally:
        os.close(fd)


def read_verified(path: bytes, top: bytes, digest: bytes | None, limit: int) -> bytes | None:
    """`read_live`, only if the bytes hash to `digest` (what the scan recorded)."""
    if digest is None:
        return None
    data = read_live(path, top, limit)
    return data if data is not None and blake3.blake3(data).digest() == digest else None
