"""Rule paths with `*` in a component: `/home/*/.ssh` is every user's `.ssh`.

A wildcard rule is matched against paths, never expanded into a list once and for all:
the walk passes through the directories that can lead to a match (waypoints) and meets
the matches as they are on disk at every scan, and the watcher watches those
directories, so a new user's `.ssh` is covered from the moment it is created.

Specificity stays a total order. The deeper rule root wins (more components); at equal
depth a literal rule path wins over a wildcard one; among wildcards of equal depth,
compared component by component from the left, a literal component beats a partial one
(`web*`), which beats a bare `*`; then the one with more literal characters; then the
pattern's text. So `/srv/www/*/uploads` decides over `/srv/*/site/uploads` for
`/srv/www/site/uploads`, whatever order the policy names them in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

STAR = b"*"


def is_pattern(path: bytes) -> bool:
    """True when a rule path holds a wildcard."""
    return STAR in path


def depth(path: bytes) -> int:
    """Number of components of a normalized absolute path ("/" has none)."""
    return 0 if path == b"/" else path.count(b"/")


def components(path: bytes) -> list[bytes]:
    return [c for c in path.split(b"/") if c]


def literal_base(pattern: bytes) -> bytes:
    """The deepest directory above a pattern's first wildcard component: where a
    walk for its matches starts (`/home` for `/home/*/.ssh`)."""
    parts: list[bytes] = []
    for part in components(pattern):
        if STAR in part:
            break
        parts.append(part)
    return b"/" + b"/".join(parts)


def _component_regex(part: bytes) -> bytes:
    # `*` matches any run of bytes within the component, leading dots included: a
    # home directory named ".x" is a home directory all the same.
    return b"[^/]*".join(re.escape(piece) for piece in part.split(STAR))


def _regex(parts: list[bytes]) -> re.Pattern[bytes]:
    return re.compile(b"(?s)/" + b"/".join(_component_regex(p) for p in parts))


def _rank(parts: list[bytes], text: bytes) -> tuple[object, ...]:
    """Sort key: the most specific pattern first (see the module docstring)."""
    shape = tuple(0 if STAR not in p else (1 if p != STAR else 2) for p in parts)
    literal = sum(len(p) - p.count(STAR) for p in parts)
    return (shape, -literal, text)


@dataclass(frozen=True)
class PathPattern:
    """One wildcard rule path, compiled."""

    text: bytes
    depth: int
    prefix: bytes  # literal_base + "/": every match starts with it
    regex: re.Pattern[bytes]
    rank: tuple[object, ...]

    @classmethod
    def compile(cls, text: bytes) -> PathPattern:
        parts = components(text)
        base = literal_base(text)
        prefix = base if base == b"/" else base + b"/"
        return cls(text, len(parts), prefix, _regex(parts), _rank(parts, text))

    def match(self, path: bytes) -> bool:
        return path.startswith(self.prefix) and self.regex.fullmatch(path) is not None


class PatternIndex:
    """Wildcard rule paths by depth, most specific first: which one decides a path."""

    def __init__(self, patterns: Iterable[bytes]) -> None:
        compiled = sorted((PathPattern.compile(p) for p in patterns), key=lambda p: p.rank)
        self.by_depth: dict[int, list[PathPattern]] = {}
        for pattern in compiled:
            self.by_depth.setdefault(pattern.depth, []).append(pattern)

    def __bool__(self) -> bool:
        return bool(self.by_depth)

    def find(self, path: bytes) -> bytes | None:
        """The text of the most specific pattern matching path exactly, or None."""
        candidates = self.by_depth.get(depth(path))
        if candidates:
            for pattern in candidates:
                if pattern.match(path):
                    return pattern.text
        return None


class Waypoints:
    """Directories strictly above some rule root: a walk must pass through them.

    Literal rule paths contribute their ancestors; a wildcard path contributes its
    literal ancestors and, from its first wildcard on, patterns (`/home/*` for
    `/home/*/.ssh`) matched at their depth.
    """

    def __init__(self, rule_paths: Iterable[bytes]) -> None:
        literal: set[bytes] = set()
        patterns: dict[int, list[PathPattern]] = {}
        for path in rule_paths:
            parts = components(path)
            for n in range(len(parts)):
                above = b"/" + b"/".join(parts[:n])
                if is_pattern(above):
                    pattern = PathPattern.compile(above)
                    if all(p.text != above for p in patterns.get(n, [])):
                        patterns.setdefault(n, []).append(pattern)
                else:
                    literal.add(above)
        self.literal = frozenset(literal)
        self.patterns = patterns

    def __contains__(self, path: object) -> bool:
        if path in self.literal:
            return True
        if not self.patterns or not isinstance(path, bytes):
            return False
        return any(p.match(path) for p in self.patterns.get(depth(path), ()))
