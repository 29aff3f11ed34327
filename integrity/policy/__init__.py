"""Load and validate a policy (TOML) into frozen rules; find the rule for a path.

A policy is refused as a whole, with a message naming the file and the key at fault;
no partial policy is ever applied.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from integrity.errors import PolicyError
from integrity.policy import cron
from integrity.policy.content import ContentPolicy, parse_content
from integrity.policy.fleet import FleetConfig, parse_fleet
from integrity.policy.metrics import MetricsSettings, parse_metrics
from integrity.policy.packages import PackageSettings as PackageSettings
from integrity.policy.packages import parse_packages
from integrity.policy.scan import ScanSettings as ScanSettings
from integrity.policy.scan import parse_scan
from integrity.record import ATTR_NAMES, NONE, PRESETS, Attr
from integrity.policy.severity import (SEVERITIES, Judgement, WindowError, parse_processes,
                       parse_windows)
from integrity.policy.dropins import (Origins, digest, dropin_files, locate, merge,
                                      normalize_rule_path, read_layer, shipped_default,
                                      shown)
from integrity.policy.wildcards import PatternIndex, Waypoints
from integrity.policy.rules import Excludes as Excludes
from integrity.policy.rules import Override as Override
from integrity.policy.rules import Rule as Rule

ALERT_TYPES = ("jsonl", "syslog", "webhook", "email", "exec")
DEFAULT_FULL_SCAN = "0 3 * * *"
SYSTEM_POLICY = "/etc/integrity/policy.toml"

_TOP_KEYS = {"database", "rule", "schedule", "alert", "public_key", "retention",
             "severity", "content", "metrics", "fleet", "scan", "packages"}
_JUDGEMENT_KEYS = {"off_hours", "off_hours_severity", "trusted_processes",
                   "trusted_severity"}
_RULE_KEYS = {"path", "check", "severity", "exclude", "include", "override", "recursive",
              "one_filesystem", "access", *_JUDGEMENT_KEYS}
_OVERRIDE_KEYS = {"match", "severity"}
_SCHEDULE_KEYS = {"full_scan"}
#: Wildcard rule instances kept per policy (a cache, refilled as it is emptied).
_INSTANCES = 4096


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
    #: The files merged into this policy: the policy file, then its drop-ins in order.
    files: tuple[str, ...] = ()
    #: The merged tables as written (`integrity policy show`): what a seal keeps of it.
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: `[content]`: what is kept for diffs and restore, and what never is.
    content: ContentPolicy = field(default_factory=ContentPolicy, compare=False)
    #: `[fleet]`: the central database this host pushes to (policy/fleet.py), or None.
    fleet: FleetConfig | None = None
    #: Directories strictly above some rule root (see Policy.is_waypoint).
    waypoints: Waypoints = field(init=False, compare=False, repr=False)
    #: `[metrics]`: where verify and scans write node_exporter's textfile, and the
    #: address the watcher serves /metrics on (policy/metrics.py validates both).
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: `[scan]`: nice level, I/O class and read-rate ceiling of scans (policy/scan.py).
    scan: ScanSettings = field(default_factory=ScanSettings)
    #: `[packages]`: evidence package approvals require (policy/packages.py); sealed.
    packages: PackageSettings = field(default_factory=PackageSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path",
                           {r.path: r for r in self.rules if not r.wildcard})
        wild = {r.path: r for r in self.rules if r.wildcard}
        object.__setattr__(self, "_wild", wild)
        object.__setattr__(self, "_patterns", PatternIndex(wild))
        object.__setattr__(self, "_instances", {})
        object.__setattr__(self, "waypoints", Waypoints(r.path for r in self.rules))

    def rule_at(self, path: bytes) -> Rule | None:
        """The rule rooted exactly at path, if any (a wildcard rule's instance when
        path is one of its matches and no literal rule names it)."""
        rule: Rule | None = self._by_path.get(path)  # type: ignore[attr-defined]
        if rule is not None or not self._patterns:  # type: ignore[attr-defined]
            return rule
        return self._wildcard_at(path)

    def _wildcard_at(self, path: bytes) -> Rule | None:
        instances: dict[bytes, Rule] = self._instances  # type: ignore[attr-defined]
        rule = instances.get(path)
        if rule is None:
            text = self._patterns.find(path)  # type: ignore[attr-defined]
            if text is None:
                return None
            if len(instances) >= _INSTANCES:
                instances.clear()
            rule = instances[path] = self._wild[text].instance(path)  # type: ignore[attr-defined]
        return rule

    def rule_for(self, path: bytes) -> Rule | None:
        """The most specific rule covering path (the deepest matching rule root; see
        wildcards.py for ties between wildcard paths)."""
        rule_at = self.rule_at
        probe = path
        while True:
            rule = rule_at(probe)
            if rule is not None:
                return rule
            if probe == b"/":
                return None
            probe = probe.rsplit(b"/", 1)[0] or b"/"

    def covers(self, path: bytes) -> bool:
        """True when path would be recorded by a scan (within a rule, not excluded,
        or excluded but named by the rule's include globs)."""
        rule = self.rule_for(path)
        if rule is None:
            return False
        if path != rule.path:
            rel_parent = path.rsplit(b"/", 1)[0] or b"/"
            if not rule.recursive and rel_parent != rule.path:
                return False
            if rule.includes.patterns and rule.includes.match(
                    path, path.rsplit(b"/", 1)[1]):
                return True
            return not self.excluded(path, rule)
        return True

    @staticmethod
    def excluded(path: bytes, rule: Rule) -> bool:
        """True when one of rule's excludes matches path or a directory between it
        and the rule's root (an excluded directory excludes what it holds)."""
        probe = path
        while probe != rule.path and probe != b"/":
            if rule.excludes.match(probe, probe.rsplit(b"/", 1)[1]):
                return True
            probe = probe.rsplit(b"/", 1)[0] or b"/"
        return False

    def is_waypoint(self, path: bytes) -> bool:
        """True when path is a directory strictly above some rule root (a literal one,
        or a possible match of a wildcard one): scans pass through it."""
        return path in self.waypoints

    def visits(self, path: bytes) -> bool:
        """True when a scan lists the directory at path: it is recorded, searched for
        a rule's include globs, or a waypoint to a rule root below it."""
        if self.covers(path) or self.is_waypoint(path):
            return True
        rule = self.rule_for(path)
        return rule is not None and rule.searches

    def in_scope(self, path: bytes) -> bool:
        """True when a scan of path means something: a rule covers it, or rules lie
        below it (`integrity verify /home` checks every user's .ssh)."""
        return self.rule_for(path) is not None or self.is_waypoint(path)

    @property
    def bases(self) -> list[bytes]:
        """Where full scans start: every literal rule path and every wildcard's base."""
        return [r.base for r in self.rules]


def default_policy_path() -> str:
    """The system policy if present, else the shipped default."""
    if os.path.exists(SYSTEM_POLICY):
        return SYSTEM_POLICY
    return shipped_default()


def load(path: str | os.PathLike[str], dropins: list[str] | None = None) -> Policy:
    """Read and validate a policy file and its drop-ins (policy.d beside it, or the
    `dropins` given); raise PolicyError naming the file and key at fault."""
    name = os.fspath(path)
    first = read_layer(name)  # the file named is the first thing that can fail
    files = dropin_files(name) if dropins is None else dropins
    layers = [first, *(read_layer(f) for f in files)]
    data, origins = merge(layers)
    policy = parse(data, name, digest(layers), origins)
    return dataclasses.replace(policy, files=tuple(layer.name for layer in layers))


def parse(data: dict[str, Any], source: str = "<policy>", digest: str = "",
          origins: Origins | None = None) -> Policy:
    """Validate a decoded policy mapping (merged from drop-ins: `origins` says which
    file each key came from, and errors name that file and its own key)."""
    def fail(key: str, message: str) -> PolicyError:
        where, local = locate(origins, key, source)
        return PolicyError(f"{shown(where)}: {local}: {message}")

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
        rules.append(dataclasses.replace(
            rule, origin=locate(origins, f"rule[{index}]", source)[0], table=dict(item)))
    schedule = data.get("schedule", {})
    if not isinstance(schedule, dict):
        raise fail("schedule", "must be a table")
    for key in schedule:
        if key not in _SCHEDULE_KEYS:
            raise fail(f"schedule.{key}", "unknown key")
    full_scan = schedule.get("full_scan", DEFAULT_FULL_SCAN)
    if not isinstance(full_scan, str):
        raise fail("schedule.full_scan", f"not a 5-field cron expression: {full_scan!r}")
    try:
        full_scan = cron.normalize(full_scan)
    except cron.CronError as exc:
        raise fail("schedule.full_scan", str(exc)) from None
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
    content = parse_content(data.get("content"), fail)
    metrics = parse_metrics(data.get("metrics", {}), fail)
    fleet = parse_fleet(data["fleet"], fail) if "fleet" in data else None
    scan = parse_scan(data.get("scan", {}), fail)
    packages = parse_packages(data.get("packages", {}), fail)
    return Policy(source, tuple(sorted(rules, key=lambda r: r.path)), database,
                  full_scan, tuple(alerts), digest, public_key, events, (source,),
                  dict(data), content, fleet, metrics, scan, packages)


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
    norm = normalize_rule_path(path)
    if "**" in norm:
        raise fail(f"{key}.path", "'*' matches within one path component; '**' is not "
                                  "supported in rule paths")
    check = parse_check(item.get("check", "config"), f"{key}.check", fail)
    severity = item.get("severity", "medium")
    if severity not in SEVERITIES:
        raise fail(f"{key}.severity", f"must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    exclude = _globs(item.get("exclude", []), f"{key}.exclude", fail)
    include = _globs(item.get("include", []), f"{key}.include", fail)
    overrides = _parse_overrides(item.get("override", []), f"{key}.override", fail)
    flags = {}
    for name in ("recursive", "one_filesystem", "access"):
        value = item.get(name, name != "access")
        if not isinstance(value, bool):
            raise fail(f"{key}.{name}", "must be true or false")
        flags[name] = value
    judgement = _parse_judgement(item, key, fail, base or Judgement())
    return Rule(os.fsencode(norm), check, severity, Excludes.compile(tuple(exclude)),
                flags["recursive"], flags["one_filesystem"], judgement,
                Excludes.compile(tuple(include)), overrides, access=flags["access"])


def _globs(value: Any, key: str, fail: Any) -> list[str]:
    """A list of exclude-syntax globs: bare names, or absolute paths."""
    if not isinstance(value, list) or not all(isinstance(e, str) and e for e in value):
        raise fail(key, "must be a list of non-empty glob strings")
    for pattern in value:
        if "/" in pattern and not pattern.startswith("/"):
            raise fail(key, f"{pattern!r}: a glob with '/' must be absolute")
        if "\x00" in pattern:
            raise fail(key, f"{pattern!r}: a glob cannot contain a NUL character")
    return value


def _parse_overrides(value: Any, key: str, fail: Any) -> tuple[Override, ...]:
    """[[rule.override]] tables: `match` globs and the `severity` their changes get."""
    if not isinstance(value, list):
        raise fail(key, "must be an array of [[rule.override]] tables")
    overrides = []
    for index, table in enumerate(value):
        here = f"{key}[{index}]"
        if not isinstance(table, dict):
            raise fail(here, "must be a table with match and severity")
        for name in table:
            if name not in _OVERRIDE_KEYS:
                raise fail(f"{here}.{name}", "unknown key")
        globs = _globs(table.get("match"), f"{here}.match", fail)
        if not globs:
            raise fail(f"{here}.match", "must name at least one glob")
        severity = table.get("severity")
        if severity not in SEVERITIES:
            raise fail(f"{here}.severity", f"must be one of {', '.join(SEVERITIES)}")
        overrides.append(Override(Excludes.compile(tuple(globs)), severity))
    return tuple(overrides)


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
