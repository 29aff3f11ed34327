"""The policy's `[packages]` table: what package approvals accept as evidence.

    [packages]
    require_signed = true      # default false

With `require_signed`, `approve --package-updates` (the apt hook's included) accepts
only the signed archive's word for content, links and attributes, as if given
`--require-signed`. Sealed with the baseline (policy/sealed.py): turning it off again
is a policy change that verify reports until `approve --policy` accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PackageSettings:
    """`[packages]`: `require_signed` (default False)."""

    require_signed: bool = False


def parse_packages(table: Any, fail: Any) -> PackageSettings:
    """Validate `[packages]`; `fail(key, message)` builds the PolicyError."""
    if not isinstance(table, dict):
        raise fail("packages", "must be a table (require_signed)")
    for key in table:
        if key != "require_signed":
            raise fail(f"packages.{key}", "unknown key")
    value = table.get("require_signed", False)
    if not isinstance(value, bool):
        raise fail("packages.require_signed", f"must be true or false, not {value!r}")
    return PackageSettings(value)
