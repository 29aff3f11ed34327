"""Rules: one protected tree, what is compared there, what is left out, how bad a
change is; and the compiled exclude and include globs a rule matches entries with."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from integrity.policy.globs import translate
from integrity.policy.severity import Judgement
from integrity.policy.wildcards import is_pattern, literal_base
from integrity.record import Attr


@dataclass(frozen=True)
class Excludes:
    """Compiled exclude globs: bare names match a name anywhere, absolute ones a path.

    In absolute globs `*`, `?` and `[...]` stay within one path component and `**`
    crosses them; whatever the glob, a match takes time linear in the path length
    (globs.py says how). An excluded directory is not descended into. Globs made only of literals
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
                (text_names if by_character else names).append(
                    translate(pattern, within_name=True))
            elif not any(ch in pattern for ch in "*?["):
                literal.add(os.fsencode(pattern.rstrip("/") or "/"))
            else:
                (text_paths if by_character else paths).append(
                    translate(pattern.rstrip("/")))
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


@dataclass(frozen=True)
class Override:
    """Entries of a rule that matter more (or less): `match` globs (exclude syntax)
    and the severity their changes get, e.g. scripts under a web root."""

    globs: Excludes
    severity: str


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
    #: Globs recorded even where an exclude would drop them; an excluded directory is
    #: then still searched for them (scripts in a web root's uploads directory).
    includes: Excludes = field(default_factory=Excludes)
    #: Severity by glob, first match wins (Rule.at).
    overrides: tuple[Override, ...] = ()
    #: For the rule met at a path by a wildcard rule: the wildcard path as written.
    pattern: bytes | None = None
    #: The policy file (or drop-in) that holds this rule.
    origin: str = field(default="", compare=False)
    #: The rule's table as written, for `integrity policy show`.
    table: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: `access = true`: the watcher also records who opens files here (secrets).
    access: bool = False
    # Derived once: the scan asks these for every entry.
    hashes: bool = field(init=False, compare=False, repr=False)
    wants_xattrs: bool = field(init=False, compare=False, repr=False)
    #: `diff`: small text files are kept for diffs (asked per entry by init).
    keeps_texts: bool = field(init=False, compare=False, repr=False)
    #: A declared rule whose path holds `*` (its instances have `pattern` set).
    wildcard: bool = field(init=False, compare=False, repr=False)
    #: Where a walk for this rule starts: its path, or a wildcard's literal base.
    base: bytes = field(init=False, compare=False, repr=False)
    searches: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        wildcard = self.pattern is None and is_pattern(self.path)
        object.__setattr__(self, "hashes", Attr.CONTENT in self.check)
        object.__setattr__(self, "wants_xattrs", Attr.XATTRS in self.check)
        object.__setattr__(self, "keeps_texts", Attr.DIFF in self.check)
        object.__setattr__(self, "wildcard", wildcard)
        object.__setattr__(self, "base", literal_base(self.path) if wildcard else self.path)
        object.__setattr__(self, "searches", bool(self.includes.patterns) and self.recursive)
        object.__setattr__(self, "_variants", {})

    @property
    def name(self) -> str:
        return os.fsdecode(self.pattern if self.pattern is not None else self.path)

    def at(self, path: bytes) -> Rule:
        """The rule as it judges `path`: with the severity of its first matching
        override, if any (reports and events read `severity` from what this returns)."""
        for override in self.overrides:
            if override.globs.match(path, path.rsplit(b"/", 1)[-1]):
                variants: dict[str, Rule] = self._variants  # type: ignore[attr-defined]
                variant = variants.get(override.severity)
                if variant is None:
                    variant = variants[override.severity] = dataclasses.replace(
                        self, severity=override.severity, overrides=())
                return variant
        return self

    def instance(self, path: bytes) -> Rule:
        """This wildcard rule as met at `path`, one of its matches."""
        return dataclasses.replace(self, path=path, pattern=self.path)
