"""Exclude globs as regular expressions that match in time linear in the path length.

A glob translated the obvious way (`*` -> `[^/]*`, `**` -> `.*`) gives Python's
backtracking `re` a pattern like `(.*a){6}.*b`: over a deep path that fails to match,
it tries every way to place each star, and `/tmp/**a**a**a**a**a**a**b` took 13 s of
CPU over 22 entries. Anyone who can name a file in a protected tree could make such a
policy (or a policy drop-in) stall every scan. So each star is given exactly one way to
match, the way fnmatch does it since Python 3.11, with atomic groups:

- Between two `**` (which match anything, '/' included), a piece of the glob is
  matched at its leftmost position and, there, ending as early as it can: whatever
  a later placement could match, the following `**` can match from an earlier end
  too. `(?>.*?PIECE)` commits to that first match and never comes back to it.
- Within one component a `*` (which never crosses '/') followed by more of the same
  component is, by the same argument, placed at the first occurrence of what follows
  it: `(?>[^/]*?FIXED)`. The last star of a component that must end at '/' (or at the
  end) is the one left free; it can only end where the component does.

Each attempt is then bounded by the length of one path component (NAME_MAX, 255
bytes), each start position is tried once, and a match costs O(path length x pattern
length). benchmarks/bench_globs.py measures it.

Semantics (README, "Excludes"): in a glob with '/', `*`, `?` and `[...]` stay within
one path component and `**` crosses components; a bracket expression never matches
'/' (as in the shell), and is read as fnmatch reads it.
"""

from __future__ import annotations

import fnmatch
import re

# Atoms: a literal character, ONE (`?`), a bracket expression, STAR, DSTAR, SLASH.
_STAR, _DSTAR, _SLASH = "*", "**", "/"


def _tokens(glob: str) -> list[str]:
    """The glob as regex atoms (each matching one character) and star/slash markers."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if ch == "*":
            j = i
            while j < len(glob) and glob[j] == "*":
                j += 1
            out.append(_DSTAR if j - i > 1 else _STAR)
            i = j
            continue
        if ch == "/":
            out.append(_SLASH)
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
                translated = fnmatch.translate(glob[i:end + 1])[len("(?s:"):-len(")\\Z")]
                if re.fullmatch(translated, "/"):  # [!a], [+-0]: but never '/'
                    translated = "(?!/)" + translated
                out.append(translated)
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return out


def _split(atoms: list[str], marker: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for atom in atoms:
        if atom == marker:
            parts.append([])
        else:
            parts[-1].append(atom)
    return parts


def _component(atoms: list[str], closed: bool) -> str:
    """One component's pattern. `closed`: it must end where the component ends (what
    follows is '/' or the end); otherwise a `**` follows and the earliest end wins."""
    fixed = ["".join(part) for part in _split(atoms, _STAR)]
    if closed and len(fixed) == 3 and not fixed[2]:
        # `*.dpkg-[a-z]*`: greedy is twice as fast as the lazy scan, and still linear
        # (the first star's choices, each checked once; the last runs to the end),
        # once the whole is atomic so that nothing later comes back into it.
        return f"(?>{fixed[0]}[^/]*{fixed[1]}[^/]*)"
    out = [fixed[0]]
    for index, piece in enumerate(fixed[1:], start=1):
        last = index == len(fixed) - 1
        if closed and last:
            out.append(f"[^/]*{piece}")  # the one free star: ends where the component does
        else:
            out.append(f"(?>[^/]*?{piece})")
    return "".join(out)


def _piece(atoms: list[str], closed: bool) -> str:
    """A run of components between `**` (or the ends): '/'-separated."""
    components = _split(atoms, _SLASH)
    return "/".join(_component(component, closed or index < len(components) - 1)
                    for index, component in enumerate(components))


def translate(glob: str, *, within_name: bool = False) -> str:
    """A regex (for fullmatch) matching what the glob matches, never backtracking
    over a star it has placed. `within_name`: a bare-name glob, where `**` is `*`."""
    atoms = _tokens(glob)
    if within_name:
        atoms = [_STAR if atom == _DSTAR else atom for atom in atoms]
    pieces = _split(atoms, _DSTAR)
    if len(pieces) == 1:
        return "(?:" + _piece(pieces[0], closed=True) + ")"
    first, *middle, last = pieces
    # A first piece without a star has one way to match: no group needed (and none
    # keeps `/var/cache/**` as quick as the plain translation).
    out = ["(?>" + _piece(first, closed=False) + ")" if _STAR in first
           else _piece(first, closed=False)]
    out += ["(?>.*?" + _piece(piece, closed=False) + ")" for piece in middle]
    out.append(".*" + _piece(last, closed=True))
    return "(?:" + "".join(out) + ")"
