"""Load and validate a policy (TOML) into frozen rules; find the rule for a path.

A policy is refused as a whole, with a message naming the file and the key at fault;
no partial policy is ever applied.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from integrity.errors import PolicyError
from integrity.record import ATTR_NAMES, NONE, PRESETS, Attr
from integrity.policy.metrics import MetricsSettings, parse_metrics
from integrity.policy.severity import (SEVERITIES, Judgement, WindowError, parse_processes,
                       parse_windows)

ALERT_TYPES = ("jsonl", "syslog", "webhook", "email", "exec")
DEFAULT_FULL_SCAN = "0 3 * * *"
SYSTEM_POLICY = "/etc/integrity/policy.toml"

_TOP_KEYS = {"database", "rule", "schedule", "alert", "public_key", "retention",
             "severity", "metrics"}
_JUDGEMENT_KEYS = {"off_hours", "off_hours_severity", "trusted_processes",
                   "trusted_severity"}
_RULE_KEYS = {"path", "check", "severity", "exclude", "recursive", "one_filesystem", "access",
              *_JUDGEMENT_KEYS}
_SCHEDULE_KEYS = {"full_scan"}


@dataclass(frozen=True)
class Excludes:
    """Compiled exclude globs: bare names match a name anywhere, absolute ones a path.

    In absolute globs `*` and `?` stay within one path component and `**` crosses
    them. An excluded directory is not descended into. Globs made only of literals
    and stars match the raw bytes (no decoding on the walk's hot path); globs with
    `?` or `[...]` count characters, as a shell does, so they match the name decoded
    as UTF-8 (undecodable bytes count as one character each, like fnmatch).
    """

    patterns: tuple[str, ...] = ()
    names: re.Pattern[bytes] | None = None
    paths: re.Pattern[bytes] | None = None
    literal: frozenset[bytes] = frozenset()
    text_names: re.Pattern[str] | None = None
    text_paths: re.Pattern[str] | None = None

    @classmethod
    def compile(cls, patterns: tuple[str, ...]) -> Excludes:
        names: list[str] = []
        paths: list[str] = []
        text_names: list[str] = []
        text_paths: list[str] = []
        literal: set[bytes] = set()
        for pattern in patterns:
            by_character = any(ch in pattern for ch in "?[")
            if "/" not in pattern:
                (text_names if by_character else names).append(_glob_regex(pattern))
            elif not any(ch in pattern for ch in "*?["):
                literal.add(os.fsencode(pattern.rstrip("/") or "/"))
            else:
                (text_paths if by_character else paths).append(
                    _glob_regex(pattern.rstrip("/")))
        return cls(patterns, _join(names, bytes), _join(paths, bytes), frozenset(literal),
                   _join(text_names, str), _join(text_paths, str))

    def match(self, path: bytes, name: bytes) -> bool:
        """True when an entry (full path, last component) is excluded."""
        if path in self.literal:
            return True
        if self.names is not None and self.names.fullmatch(name):
            return True
        if self.paths is not None and self.paths.fullmatch(path):
            return True
        if self.text_names is not None and self.text_names.fullmatch(os.fsdecode(name)):
            return True
        return self.text_paths is not None and \
            self.text_paths.fullmatch(os.fsdecode(path)) is not None


def _join(regexes: list[str], kind: type) -> Any:
    if not regexes:
        return None
    joined = "(?s)" + "|".join(regexes)
    return re.compile(os.fsencode(joined) if kind is bytes else joined)


def _glob_regex(glob: str) -> str:
    """Translate a shell glob to a regex: `*`, `?` stay within a component, `**` not.

    Bracket expressions are translated by fnmatch itself, so `[!]`, `[z-a]`, `[]]`
    and nested `[` mean what they mean there instead of raising re.error.
    """
    out, i = [], 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            # fnmatch's rule for where a bracket expression ends.
            j = i + 1
            if j < len(glob) and glob[j] == "!":
                j += 1
            if j < len(glob) and glob[j] == "]":
                j += 1
            end = glob.find("]", j)
            if end == -1:
                out.append(re.escape(ch))
            else:
                translated = fnmatch.translate(glob[i:end + 1])
                out.append(translated[len("(?s:"):-len(")\\Z")])
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "(?:" + "".join(out) + ")"


@dataclass(frozen=True)
class Rule:
    """One protected tree: what to compare there and how bad a change is."""

    path: bytes
    check: Attr
    severity: str = "medium"
    excludes: Excludes = field(default_factory=Excludes)
    recursive: bool = True
    one_filesystem: bool = True
    #: When and by whom a change moves this rule's severity (severity.py).
    judgement: Judgement = field(default_factory=Judgement)
    #: `access = true`: the watcher also records who opens files here (secrets).
    access: bool = False
    # Derived once: the scan asks these for every entry.
    hashes: bool = field(init=False, compare=False, repr=False)
    wants_xattrs: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes", Attr.CONTENT in self.check)
        object.__setattr__(self, "wants_xattrs", Attr.XATTRS in self.check)

    @property
    def name(self) -> str:
        return os.fsdecode(self.path)


@dataclass(frozen=True)
class Policy:
    """A validated policy: rules by path, schedule, alert sinks and database URL."""

    source: str
    rules: tuple[Rule, ...]
    database: str | None = None
    full_scan: str = DEFAULT_FULL_SCAN
    alerts: tuple[dict[str, Any], ...] = ()
    digest: str = ""
    #: With a public key, verify and watch refuse a baseline whose root it did not sign.
    public_key: str | None = None
    #: `[retention] events = "90d"`: the watcher prunes closed events older than this.
    retention: str | None = None
    #: `[metrics]`: where verify and scans write node_exporter's textfile, and the
    #: address the watcher serves /metrics on (policy/metrics.py validates both).
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path", {r.path: r for r in self.rules})

    def rule_at(self, path: bytes) -> Rule | None:
        """The rule rooted exactly at path, if any."""
        return self._by_path.get(path)  # type: ignore[attr-defined, no-any-return]

    def rule_for(self, path: bytes) -> Rule | None:
        """The most specific rule covering path (longest matching rule path)."""
        by_path: dict[bytes, Rule] = self._by_path  # type: ignore[attr-defined]
        probe = path
        while True:
            rule = by_path.get(probe)
            if rule is not None:
                return rule
            if probe == b"/":
                return None
            probe = probe.rsplit(b"/", 1)[0] or b"/"

    def covers(self, path: bytes) -> bool:
        """True when path would be recorded by a scan (within a rule, not excluded)."""
        rule = self.rule_for(path)
        if rule is None:
            return False
        if path != rule.path:
            rel_parent = path.rsplit(b"/", 1)[0] or b"/"
            if not rule.recursive and rel_parent != rule.path:
                return False
            probe = path
            while probe != rule.path:
                if rule.excludes.match(probe, probe.rsplit(b"/", 1)[1]):
                    return False
                probe = probe.rsplit(b"/", 1)[0] or b"/"
        return True


def default_policy_path() -> str:
    """The system policy if present, else the shipped default."""
    if os.path.exists(SYSTEM_POLICY):
        return SYSTEM_POLICY
    return str(resources.files("integrity.policies").joinpath("default.toml"))


def load(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; raise PolicyError naming file and key."""
    name = os.fspath(path)
    try:
        raw = Path(name).read_bytes()
    except OSError as exc:
        raise PolicyError(f"{name}: cannot read policy: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{name}: policy is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{name}: invalid TOML: {exc}") from None
    return parse(data, name, hashlib.sha256(raw).hexdigest())


def parse(data: dict[str, Any], source: str = "<policy>", digest: str = "") -> Policy:
    """Validate a decoded policy mapping."""
    def fail(key: str, message: str) -> PolicyError:
        return PolicyError(f"{source}: {key}: {message}")

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(key, "unknown key")
    database = data.get("database")
    if database is not None and (not isinstance(database, str) or not database):
        raise fail("database", "must be a non-empty SQLAlchemy URL string")
    rules_data = data.get("rule")
    if not isinstance(rules_data, list) or not rules_data:
        raise fail("rule", "at least one [[rule]] table is required")
    defaults = data.get("severity", {})
    if not isinstance(defaults, dict):
        raise fail("severity", "must be a table (off_hours, trusted_processes, ...)")
    for key in defaults:
        if key not in _JUDGEMENT_KEYS:
            raise fail(f"severity.{key}", "unknown key")
    base = _parse_judgement(defaults, "severity", fail, Judgement())
    rules: list[Rule] = []
    seen: set[bytes] = set()
    for index, item in enumerate(rules_data):
        rule = _parse_rule(item, f"rule[{index}]", fail, base)
        if rule.path in seen:
            raise fail(f"rule[{index}].path", f"duplicate rule for {rule.name}")
        seen.add(rule.path)
        rules.append(rule)
    schedule = data.get("schedule", {})
    if not isinstance(schedule, dict):
        raise fail("schedule", "must be a table")
    for key in schedule:
        if key not in _SCHEDULE_KEYS:
            raise fail(f"schedule.{key}", "unknown key")
    full_scan = schedule.get("full_scan", DEFAULT_FULL_SCAN)
    if not isinstance(full_scan, str) or not _valid_cron(full_scan):
        raise fail("schedule.full_scan", f"not a 5-field cron expression: {full_scan!r}")
    alerts_data = data.get("alert", [])
    if not isinstance(alerts_data, list):
        raise fail("alert", "must be an array of [[alert]] tables")
    alerts = []
    for index, alert in enumerate(alerts_data):
        key = f"alert[{index}]"
        if not isinstance(alert, dict):
            raise fail(key, "must be a table")
        if alert.get("type") not in ALERT_TYPES:
            raise fail(f"{key}.type", f"must be one of {', '.join(ALERT_TYPES)}")
        severity = alert.get("min_severity", "low")
        if severity not in SEVERITIES:
            raise fail(f"{key}.min_severity", f"must be one of {', '.join(SEVERITIES)}")
        alerts.append(dict(alert))
    public_key = data.get("public_key")
    if public_key is not None and (not isinstance(public_key, str)
                                   or not public_key.startswith("/")):
        raise fail("public_key", "must be the absolute path of an Ed25519 public key (PEM)")
    retention = data.get("retention", {})
    if not isinstance(retention, dict) or set(retention) - {"events"}:
        raise fail("retention", "must be a table with one key, events (e.g. \"90d\")")
    events = retention.get("events")
    if events is not None and (not isinstance(events, str)
                               or not re.fullmatch(r"\d+[hdw]", events.strip())):
        raise fail("retention.events", f"must be a duration like \"90d\", not {events!r}")
    metrics = parse_metrics(data.get("metrics", {}), fail)
    return Policy(source, tuple(sorted(rules, key=lambda r: r.path)), database,
                  full_scan, tuple(alerts), digest, public_key, events, metrics)


def _parse_judgement(table: dict[str, Any], key: str, fail: Any,
                     base: Judgement) -> Judgement:
    """A rule's when-and-who settings over the policy's [severity] defaults."""
    values: dict[str, Any] = {}
    for name in ("off_hours_severity", "trusted_severity"):
        if name in table:
            if table[name] not in SEVERITIES:
                raise fail(f"{key}.{name}", f"must be one of {', '.join(SEVERITIES)}")
            values[name] = table[name]
    try:
        if "off_hours" in table:
            values["off_hours"] = parse_windows(table["off_hours"])
    except WindowError as exc:
        raise fail(f"{key}.off_hours", str(exc)) from None
    try:
        if "trusted_processes" in table:
            values["trusted_processes"] = parse_processes(table["trusted_processes"])
    except WindowError as exc:
        raise fail(f"{key}.trusted_processes", str(exc)) from None
    return Judgement(**{**base.__dict__, **values})


def _parse_rule(item: Any, key: str, fail: Any,
                base: Judgement | None = None) -> Rule:
    if not isinstance(item, dict):
        raise fail(key, "must be a table")
    for name in item:
        if name not in _RULE_KEYS:
            raise fail(f"{key}.{name}", "unknown key")
    path = item.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise fail(f"{key}.path", "required, and must be an absolute path")
    if "\x00" in path:
        raise fail(f"{key}.path", "a path cannot contain a NUL character")
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    check = parse_check(item.get("check", "config"), f"{key}.check", fail)
    severity = item.get("severity", "medium")
    if severity not in SEVERITIES:
        raise fail(f"{key}.severity", f"must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    exclude = item.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) and e for e in exclude):
        raise fail(f"{key}.exclude", "must be a list of non-empty glob strings")
    for pattern in exclude:
        if "/" in pattern and not pattern.startswith("/"):
            raise fail(f"{key}.exclude", f"{pattern!r}: a glob with '/' must be absolute")
        if "\x00" in pattern:
            raise fail(f"{key}.exclude", f"{pattern!r}: a glob cannot contain a NUL character")
    flags = {}
    for name in ("recursive", "one_filesystem", "access"):
        value = item.get(name, name != "access")
        if not isinstance(value, bool):
            raise fail(f"{key}.{name}", "must be true or false")
        flags[name] = value
    judgement = _parse_judgement(item, key, fail, base or Judgement())
    return Rule(os.fsencode(norm), check, severity, Excludes.compile(tuple(exclude)),
                flags["recursive"], flags["one_filesystem"], judgement, flags["access"])


def parse_check(value: Any, key: str = "check", fail: Any = None) -> Attr:
    """Parse a check set: a preset, attribute names, and +attr / -attr adjustments."""
    def error(message: str) -> PolicyError:
        return fail(key, message) if fail else PolicyError(f"{key}: {message}")

    if isinstance(value, str):
        tokens = value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        tokens = list(value)
    else:
        raise error("must be a preset name, a list of attributes, or 'preset +attr -attr'")
    if not tokens:
        raise error("is empty")
    result = NONE
    for token in tokens:
        if not token.strip() or token != token.strip():
            raise error(f"{token!r} is not a preset or attribute name")
        sign, name = (token[0], token[1:]) if token[:1] in "+-" else ("+", token)
        flag = PRESETS.get(name, ATTR_NAMES.get(name))
        if flag is None:
            known = ", ".join([*PRESETS, *ATTR_NAMES])
            raise error(f"unknown preset or attribute {name!r} (known: {known})")
        result = result | flag if sign == "+" else result & ~flag
    if Attr.TYPE not in result:
        result |= Attr.TYPE  # a file replaced by a link is always a change
    return result


_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$|^[a-zA-Z]{3}(-[a-zA-Z]{3})?$")


def _valid_cron(expr: str) -> bool:
    fields = expr.split()
    return len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields)
