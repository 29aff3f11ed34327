"""Reading one [[alert]] table: typed getters that refuse bad values by key name.

Every getter records the key it was asked for; `finish` then refuses whatever the
table holds that no getter asked about, so a misspelt option (`time_out`) is an error
at load time instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Any

from integrity.errors import PolicyError
from integrity.policy.severity import SEVERITIES

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SINK_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Options:
    """One [[alert]] table of a policy, read key by key."""

    def __init__(self, source: str, index: int, table: dict[str, Any]) -> None:
        self.where = f"{source}: alert[{index}]"
        self.type = str(table.get("type"))
        self._table = table
        self._read = {"type", "min_severity"}
        self.min_severity = self.choice("min_severity", SEVERITIES, "low")
        # Undelivered alerts are owed to this name: an explicit one survives the
        # tables being reordered, the default (position and type) does not.
        named = self._get("name")
        if named is not None and (not isinstance(named, str)
                                  or not _SINK_NAME.fullmatch(named)):
            raise self.fail("name", "must be 1-64 letters, digits, '.', '_' or '-'")
        self.name = named or f"alert[{index}]:{self.type}"

    def fail(self, key: str, what: str) -> PolicyError:
        """The error for one key: 'policy.toml: alert[1].timeout: what is wrong'."""
        return PolicyError(f"{self.where}.{key}: {what}")

    def has(self, key: str) -> bool:
        """Whether the table sets a key (and count it as known)."""
        self._read.add(key)
        return key in self._table

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._table.get(key)

    def string(self, key: str, default: str | None = None, *,
               required: bool = False) -> str | None:
        """A one-line string; `required` refuses an absent key."""
        value = self._get(key)
        if value is None:
            if required:
                raise self.fail(key, f"is required for a {self.type} sink")
            return default
        if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
            raise self.fail(key, "must be a non-empty string on one line")
        return value

    def required(self, key: str) -> str:
        """A one-line string that must be present."""
        value = self.string(key, required=True)
        assert value is not None
        return value

    def path(self, key: str, default: str | None = None, *,
             required: bool = False) -> str | None:
        """An absolute path (files are opened by the daemon, whose cwd is /)."""
        value = self.string(key, default, required=required)
        if value is not None and not value.startswith("/"):
            raise self.fail(key, f"must be an absolute path, not {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        """A number of seconds (integer or float) above `minimum`."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not value > minimum:
            raise self.fail(key, f"must be a number greater than {minimum:g}, not {value!r}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        """An integer no smaller than `minimum`."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"must be an integer of at least {minimum}, not {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        """One of a fixed set of words."""
        value = self._get(key)
        if value is None:
            return default
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    def strings(self, key: str) -> list[str]:
        """A required, non-empty array of non-empty strings."""
        value = self._get(key)
        if value is None:
            raise self.fail(key, f"is required for a {self.type} sink")
        if not isinstance(value, list) or not value \
                or not all(isinstance(item, str) and item for item in value):
            raise self.fail(key, "must be a non-empty array of non-empty strings")
        return list(value)

    def table(self, key: str, *, one_line: bool = True) -> dict[str, str]:
        """A table of string values (e.g. headers); absent means empty."""
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table of strings")
        for name, item in value.items():
            if not isinstance(item, str) or one_line and ("\n" in item or "\r" in item):
                raise self.fail(f"{key}.{name}", "must be a string"
                                + (" on one line" if one_line else ""))
        return dict(value)

    def environment(self, key: str) -> dict[str, str]:
        """A table of environment variables: valid names, values without NUL."""
        env = self.table(key, one_line=False)
        for name, value in env.items():
            if not _ENV_NAME.fullmatch(name):
                raise self.fail(f"{key}.{name}", "is not a valid environment variable name")
            if "\0" in value:
                raise self.fail(f"{key}.{name}", "must not contain a NUL character")
        return env

    def finish(self) -> None:
        """Refuse any key that the sink did not ask for."""
        unknown = sorted(set(self._table) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self.fail(unknown[0], f"unknown key for a {self.type} sink "
                                        f"(known keys: {known})")
