"""The effective policy, after drop-ins: as JSON, and as TOML one could load again.

`integrity policy show` answers "what does this host actually protect, and which file
said so?" once several files contribute. Each rule is shown with the file it came from,
its defaults filled in (check, severity) and its check set spelled out as attributes.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from integrity.policy import DEFAULT_FULL_SCAN, Policy, Rule
from integrity.record import attr_names

_TABLES = ("schedule", "severity", "retention", "fleet")


def rule_doc(rule: Rule) -> dict[str, Any]:
    """One rule as written, with its defaults and its source file."""
    doc: dict[str, Any] = {"path": rule.name, "file": rule.origin}
    doc["check"] = rule.table.get("check", "config")
    doc["attributes"] = attr_names(rule.check)
    doc["severity"] = rule.severity
    doc["recursive"] = rule.recursive
    doc["one_filesystem"] = rule.one_filesystem
    for key, value in rule.table.items():
        if key not in doc:
            doc[key] = value
    return doc


def policy_doc(policy: Policy) -> dict[str, Any]:
    """The effective policy as one JSON-ready object."""
    data = policy.data
    doc: dict[str, Any] = {"files": list(policy.files or (policy.source,))}
    for key in ("database", "public_key"):
        if data.get(key) is not None:
            doc[key] = data[key]
    schedule = dict(data.get("schedule") or {})
    schedule.setdefault("full_scan", DEFAULT_FULL_SCAN)
    doc["schedule"] = schedule
    for key in ("severity", "retention", "fleet"):
        if data.get(key):
            doc[key] = data[key]
    doc["rules"] = [rule_doc(rule) for rule in policy.rules]
    doc["alerts"] = [dict(alert) for alert in policy.alerts]
    return doc


def _value(value: Any) -> str:
    """A TOML value. Strings are JSON-escaped, which TOML reads the same, control
    characters included (DEL, which JSON leaves alone, is escaped too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a TOML value: {value!r}")


def _escaped(text: str) -> str:
    """Text for a comment line: escaped as in a string, without the quotes."""
    return _value(text)[1:-1]


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _value(key)


def _table(lines: list[str], header: str, table: dict[str, Any], skip: tuple[str, ...] = (),
           ) -> None:
    lines.append(header)
    for key, value in table.items():
        if key not in skip:
            lines.append(f"{_key(key)} = {_value(value)}")


def policy_toml(policy: Policy) -> str:
    """The effective policy as TOML, each rule preceded by the file it came from."""
    doc = policy_doc(policy)
    files = doc["files"]
    lines = [f"# effective policy: {_escaped(files[0])}"]
    if len(files) > 1:
        lines.append(f"# with {len(files) - 1} drop-in{'s' if len(files) > 2 else ''}, "
                     "merged in this order:")
        lines += [f"#   {_escaped(name)}" for name in files[1:]]
    scalars = [f"{key} = {_value(doc[key])}" for key in ("database", "public_key")
               if key in doc]
    if scalars:
        lines += ["", *scalars]
    for key in _TABLES:
        if key in doc:
            lines.append("")
            _table(lines, f"[{key}]", doc[key])
    for rule in doc["rules"]:
        lines.append("")
        lines.append(f"# from {_escaped(rule['file'])}")
        _table(lines, "[[rule]]", rule, skip=("file", "attributes", "override"))
        for override in rule.get("override") or ():
            _table(lines, "[[rule.override]]", override)
    for alert in doc["alerts"]:
        lines.append("")
        _table(lines, "[[alert]]", alert)
    return "\n".join(lines) + "\n"
