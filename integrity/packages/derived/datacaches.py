"""Data caches a tool writes as a tree: made again into a temporary place, compared
file by file.

| tree | tool run | made from |
|---|---|---|
| `/usr/share/mime` (all but `packages/`) | `update-mime-database TMP` | links to `packages/*.xml` |
| `/usr/share/icons/THEME/icon-theme.cache` | `gtk-update-icon-cache --force --quiet TMP/THEME` | a mirror of the theme (links) |
| `/var/cache/fontconfig/*` | `fc-cache -s`, a temporary directory mounted over the cache directory for it alone | the font directories of /etc/fonts |

The inputs are data the tools parse, never run. Every path of the tree the tool did
not make must be gone; a directory it made must be one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from integrity.packages.common import Verdict
from integrity.packages.derived.common import (Change, Context, dir_verdict, file_verdict)
from integrity.packages.derived.sandbox import Mount, ToolError, unusable
from integrity.paths import display

MIME = b"/usr/share/mime"
ICONS = b"/usr/share/icons"
FONTS = b"/var/cache/fontconfig"

#: What a tool made below a unit's root: relative files (bytes) and directories.
Tree = tuple[dict[bytes, bytes], set[bytes], str]


def _read_tree(top: str, skip: bytes | None = None) -> tuple[dict[bytes, bytes], set[bytes]]:
    files: dict[bytes, bytes] = {}
    dirs: set[bytes] = set()
    base = os.fsencode(top)
    for root, subdirs, names in os.walk(base):
        rel = os.path.relpath(root, base)
        if skip is not None:
            subdirs[:] = [d for d in subdirs if os.path.normpath(
                os.path.join(rel, d)) != skip]
        for d in subdirs:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                files[os.path.normpath(os.path.join(rel, name))] = handle.read()
    return files, dirs


class TreeCache:
    """A tree of derived files per unit, made once by `tool`."""

    def __init__(self, tool: str, unit: Callable[[bytes], bytes | None],
                 make: Callable[[TreeCache, bytes, Context], Tree]) -> None:
        self.name = tool
        self._unit = unit
        self._make = make

    def claims(self, change: Change) -> bool:
        return self._unit(change.path) is not None

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        units: dict[bytes, list[Change]] = {}
        for change in changes:
            unit = self._unit(change.path)
            assert unit is not None
            units.setdefault(unit, []).append(change)
        verdicts: dict[bytes, Verdict] = {}
        for unit, members in units.items():
            try:
                files, dirs, how = self._make(self, unit, ctx)
            except ToolError as exc:
                verdicts.update((c.path, unusable(exc, c.path)) for c in members)
                continue
            for change in members:
                rel = os.path.relpath(change.path, unit)
                if rel == b".":
                    dirs.add(rel)  # the tree's own directory, which the tool writes into
                if rel in dirs or (change.new is not None and change.new.type == "dir"):
                    verdicts[change.path] = dir_verdict(change, rel in dirs, self.name, how)
                else:
                    verdicts[change.path] = file_verdict(change, files.get(rel), self.name,
                                                         how)
        return verdicts

    def owner(self, trigger: bytes, ctx: Context) -> tuple[str, str]:
        """(package, tool path) of the package interested in `trigger` that ships the
        tool (or, for a tool no trigger runs, the package that ships it)."""
        wanted = os.fsencode(self.name)
        keys = ctx.trigger_interests().get(trigger, [])
        for key in keys:
            for path in ctx.package_files(key):
                if os.path.basename(path) == wanted:
                    return key, os.fsdecode(path)
        raise ToolError(f"no installed package interested in {display(trigger)} ships "
                        f"{self.name}")


def _mime_unit(path: bytes) -> bytes | None:
    if not path.startswith(MIME + b"/"):
        return None
    rel = path[len(MIME) + 1:]
    return None if rel == b"packages" or rel.startswith(b"packages/") else MIME


def _mime(kind: TreeCache, unit: bytes, ctx: Context) -> Tree:
    key, tool = kind.owner(unit + b"/packages", ctx)
    work = ctx.sandbox.tempdir("mime-")
    packages = os.path.join(work, "mime", "packages")
    os.makedirs(packages)
    sources = os.path.join(unit, b"packages")
    for name in sorted(os.listdir(sources)):
        if name.endswith(b".xml") and os.path.isfile(os.path.join(sources, name)):
            os.symlink(os.path.join(sources, name), os.path.join(os.fsencode(packages), name))
    ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), os.path.join(work, "mime")], cwd=work,
                    env={"PKGSYSTEM_ENABLE_FSYNC": "0"})
    files, dirs = _read_tree(os.path.join(work, "mime"), skip=b"packages")
    return files, dirs, f"from {display(sources)}, as {key}'s trigger runs it"


def _icon_unit(path: bytes) -> bytes | None:
    parent, base = os.path.split(path)
    if base == b"icon-theme.cache" and os.path.dirname(parent) == ICONS:
        return parent
    return None


def _icons(kind: TreeCache, unit: bytes, ctx: Context) -> Tree:
    tool = "/usr/bin/gtk-update-icon-cache"
    theme = os.path.basename(unit)
    work = os.fsencode(ctx.sandbox.tempdir("icons-"))
    mirror = os.path.join(work, theme)
    count = 0
    for root, dirs, names in os.walk(unit):
        target = os.path.join(mirror, os.path.relpath(root, unit))
        os.makedirs(target, exist_ok=True)
        for name in names:
            if name != b"icon-theme.cache" and not name.startswith(b".icon-theme"):
                os.symlink(os.path.join(root, name), os.path.join(target, name))
                count += 1
    ctx.sandbox.run([ctx.sandbox.tool(tool), "--force", "--quiet", os.fsdecode(mirror)],
                    cwd=os.fsdecode(work))
    made = os.path.join(mirror, b"icon-theme.cache")
    files = {}
    if os.path.exists(made):
        with open(made, "rb") as handle:
            files[b"icon-theme.cache"] = handle.read()
    return files, set(), f"from the {count} files of {display(unit)}"


def _font_unit(path: bytes) -> bytes | None:
    return FONTS if path == FONTS or path.startswith(FONTS + b"/") else None


def _fonts(kind: TreeCache, unit: bytes, ctx: Context) -> Tree:
    key, tool = kind.owner(b"/usr/share/fonts", ctx)
    work = ctx.sandbox.tempdir("fontconfig-")
    os.chmod(work, 0o755)
    # fc-cache writes only to the cache directory of /etc/fonts: a private mount puts
    # our directory there for fc-cache alone.
    ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), "-s"], cwd=work,
                    mounts=[Mount(os.fsdecode(unit), work)])
    files, dirs = _read_tree(work)
    return files, dirs, f"from the font directories of /etc/fonts, as {key}'s trigger runs it"


def data_caches() -> list[TreeCache]:
    """The tree cache kinds of this module."""
    return [TreeCache("update-mime-database", _mime_unit, _mime),
            TreeCache("gtk-update-icon-cache", _icon_unit, _icons),
            TreeCache("fc-cache", _font_unit, _fonts)]
