"""`[content]`: which file contents a baseline keeps for diffs and restore, and which
it must never keep.

Content is kept for rules whose check has `diff` (the `config` preset has it), for
text files up to `max_diff_size`. A file matching a `secret` glob (the defaults name
shadow files, ssh host keys and `*.key`; the policy adds more) or holding a private
key block is never kept, whatever its name; in kept files the values of lines that
look like credentials are replaced before they are stored (`redact` adds regexes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from integrity.errors import PolicyError

DEFAULT_MAX_DIFF_SIZE = 256 << 10
DEFAULT_SECRETS = ("/etc/shadow", "/etc/gshadow", "*shadow-", "/etc/ssh/ssh_host_*_key",
                   "*.key",
                   # WireGuard's quick start: `wg genkey | tee privatekey`, bare base64
                   "*privatekey*")
#: Names that say a value is a credential (WordPress's keys and salts, WireGuard's
#: and wpa_supplicant's pre-shared keys included).
_SECRET_NAME = (r"[\w.\-]*(?:password|passwd|passphrase|secret|token|api[_\-]?key|apikey"
                r"|access[_\-]?key|private[_\-]?key|credentials?|auth[_\-]?key"
                r"|nonce[_\-]?key|logged[_\-]?in[_\-]?key|salt|preshared[_\-]?key|psk)"
                r"[\w.\-]*")
#: A quoted value, or one up to the end of its token.
_QUOTED = r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;)\]}]+)"""
DEFAULT_REDACT = (
    # `name = value`, `name: value` and `export NAME=value`
    rf"(?i)^(?P<keep>\s*(?:export\s+)?{_SECRET_NAME}\s*[:=]\s*)(?P<value>\S.*?)\s*$",
    # user:password@ in URLs (database and proxy URLs)
    r"(?P<keep>[a-z][a-z0-9+.\-]*://[^/\s:@]+:)(?P<value>[^@\s/]+)(?=@)",
    # a quoted name: JSON and YAML "password": ..., PHP 'password' => ...,
    # define('DB_PASSWORD', ...)
    rf"""(?i)(?P<keep>["']{_SECRET_NAME}["']\s*(?:=>|[:=,])\s*){_QUOTED}""",
    # PHP variables and properties: $password = ..., public $db_password = ...
    rf"(?i)(?P<keep>\${_SECRET_NAME}\s*=\s*){_QUOTED}",
    # XML elements: <password>...</password>
    rf"(?i)(?P<keep><{_SECRET_NAME}(?:\s[^>\n]*)?>)(?P<value>[^<\n]+)",
)
_KEYS = {"max_diff_size", "secret", "redact"}


@dataclass(frozen=True)
class ContentPolicy:
    """The `[content]` table, validated."""

    max_diff_size: int = DEFAULT_MAX_DIFF_SIZE
    secrets: tuple[str, ...] = DEFAULT_SECRETS
    redact: tuple[re.Pattern[str], ...] = field(
        default_factory=lambda: tuple(re.compile(p, re.MULTILINE) for p in DEFAULT_REDACT))


def parse_content(table: Any, fail: Callable[[str, str], PolicyError]) -> ContentPolicy:
    """Validate `[content]`; `secret` and `redact` add to the defaults."""
    if table is None:
        return ContentPolicy()
    if not isinstance(table, dict):
        raise fail("content", "must be a table (max_diff_size, secret, redact)")
    for key in table:
        if key not in _KEYS:
            raise fail(f"content.{key}", "unknown key")
    size = table.get("max_diff_size", DEFAULT_MAX_DIFF_SIZE)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 16 << 20:
        raise fail("content.max_diff_size", "must be a number of bytes from 0 to 16 MiB")
    secrets = table.get("secret", [])
    if not isinstance(secrets, list) or not all(isinstance(s, str) and s for s in secrets):
        raise fail("content.secret", "must be a list of globs")
    patterns = table.get("redact", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise fail("content.redact", "must be a list of regular expressions")
    compiled = []
    for index, pattern in enumerate([*DEFAULT_REDACT, *patterns]):
        key = f"content.redact[{index - len(DEFAULT_REDACT)}]"
        try:
            regex = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise fail(key, f"not a regular expression: {exc}") from None
        if "value" not in regex.groupindex:
            raise fail(key, "needs a group (?P<value>...) naming what to redact")
        compiled.append(regex)
    return ContentPolicy(size, (*DEFAULT_SECRETS, *secrets), tuple(compiled))
