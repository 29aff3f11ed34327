"""Trigger caches made by a query tool: made again into a temporary place, compared.

Each cache belongs to the package whose dpkg trigger interest covers its inputs (its
postinst regenerates it when triggered), and only that package's own tool is run:

| cache | package interested in | tool run |
|---|---|---|
| `…/gdk-pixbuf-2.0/2.10.0/loaders.cache` | the `loaders` directories | `gdk-pixbuf-query-loaders LOADER…` (stdout) |
| `…/gio/modules/giomodule.cache` | the modules directory | `gio-querymodules TMP` over links to the modules |
| `…/glib-2.0/schemas/gschemas.compiled` | the schemas directory | `glib-compile-schemas --targetdir=TMP DIR` |
| `/etc/ld.so.cache` | the `ldconfig` trigger | `ldconfig -X -C TMP/ld.so.cache` |

gdk-pixbuf-query-loaders and gio-querymodules load the modules they describe: every
module must be its package's own file, unchanged, or the tool is not run. ldconfig
reads libraries without running them and follows /etc/ld.so.conf, which is watched as
configuration of its own. When no installed package is interested any more, the cache
must be gone (its postrm purges it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from integrity.packages.common import Verdict
from integrity.packages.derived.common import Change, Context, file_verdict
from integrity.packages.derived.sandbox import Mount, ToolError, unusable
from integrity.paths import display

#: A regenerated cache: its bytes (None: the tool makes none) and how it was made.
Made = tuple[bytes | None, str]


class TriggerCache:
    """One cache file per unit (its path), made by `tool` from its package's trigger."""

    name = ""

    def __init__(self, tool: str, basename: bytes,
                 regenerate: Callable[[TriggerCache, bytes, Context], Made],
                 trigger: Callable[[bytes], bytes] | None = None) -> None:
        self.name = tool
        self._basename = basename
        self._regenerate = regenerate
        #: cache path -> the trigger a package must be interested in
        self._trigger = trigger or os.path.dirname

    def claims(self, change: Change) -> bool:
        return os.path.basename(change.path) == self._basename

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        return {change.path: self._judge(change, ctx) for change in changes}

    def _judge(self, change: Change, ctx: Context) -> Verdict:
        try:
            data, how = self._regenerate(self, change.path, ctx)
        except ToolError as exc:
            return unusable(exc, change.path)
        return file_verdict(change, data, self.name, how)

    def owner(self, cache: bytes, ctx: Context) -> tuple[str, str] | None:
        """(package, tool path) of the installed package interested in the cache's
        trigger that ships the tool; None when no package is interested any more."""
        trigger = self._trigger(cache)
        interested = ctx.trigger_interests().get(trigger, [])
        for key in interested:
            for path in ctx.package_files(key):
                if os.path.basename(path) == os.fsencode(self.name):
                    return key, os.fsdecode(path)
        if interested:
            raise ToolError(f"{interested[0]} is interested in {display(trigger)} but "
                            f"ships no {self.name}")
        return None

    def modules(self, paths: list[bytes], ctx: Context) -> None:
        """Refuse to run a tool that would load a module no package vouches for."""
        for path in paths:
            verdict = ctx.vouched(os.path.realpath(path))
            if not verdict.vouched:
                raise ToolError(f"{self.name} would load {display(path)}, which is not "
                                f"vouched for: {verdict.reason}")


def _so_files(directory: bytes, recursive: bool) -> list[bytes]:
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, name) for name in files if name.endswith(b".so")]
        if not recursive:
            dirs[:] = []
    return found


def _pixbuf(kind: TriggerCache, cache: bytes, ctx: Context) -> Made:
    owner = kind.owner(cache, ctx)
    if owner is None:
        return None, "no installed package is interested in its loaders"
    key, tool = owner
    # As the postinst runs it: every *.so below the package's loader directories,
    # in C-locale order.
    dirs = [d for d, keys in ctx.trigger_interests().items()
            if key in keys and d.endswith(b"/loaders")]
    loaders = sorted(path for d in dirs for path in _so_files(d, True))
    kind.modules(loaders, ctx)
    out = ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), *map(os.fsdecode, loaders)],
                          cwd=ctx.sandbox.tempdir("pixbuf-"))
    return out, f"{len(loaders)} loaders, as {key}'s trigger runs it"


def _gio(kind: TriggerCache, cache: bytes, ctx: Context) -> Made:
    owner = kind.owner(cache, ctx)
    if owner is None:
        return None, "no installed package is interested in its modules"
    key, tool = owner
    modules = sorted(_so_files(os.path.dirname(cache), False))
    kind.modules(modules, ctx)
    work = ctx.sandbox.tempdir("gio-")
    for module in modules:
        os.symlink(module, os.path.join(os.fsencode(work), os.path.basename(module)))
    ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), work], cwd=work)
    made = os.path.join(work, "giomodule.cache")
    how = f"{len(modules)} modules, as {key}'s trigger runs it"
    if not os.path.exists(made):
        return None, how
    with open(made, "rb") as handle:
        return handle.read(), how


def _schemas(kind: TriggerCache, cache: bytes, ctx: Context) -> Made:
    owner = kind.owner(cache, ctx)
    if owner is None:
        return None, "no installed package is interested in its schemas"
    key, tool = owner
    work = ctx.sandbox.tempdir("schemas-")
    ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), f"--targetdir={work}",
                     os.fsdecode(os.path.dirname(cache))], cwd=work)
    with open(os.path.join(work, "gschemas.compiled"), "rb") as handle:
        return handle.read(), f"as {key}'s trigger runs it"


def _ldconfig(kind: TriggerCache, cache: bytes, ctx: Context) -> Made:
    owner = kind.owner(cache, ctx)
    if owner is None:
        return None, "no installed package handles the ldconfig trigger"
    key, tool = owner
    work = ctx.sandbox.tempdir("ldconfig-")
    made = os.path.join(work, "ld.so.cache")
    # ldconfig also rewrites its aux-cache whatever -C says: give it a private one.
    mounts = [Mount("/var/cache/ldconfig")] if os.path.isdir("/var/cache/ldconfig") else []
    ctx.sandbox.run([ctx.sandbox.tool(tool, [key]), "-X", "-C", made], cwd=work,
                    mounts=mounts)
    with open(made, "rb") as handle:
        return handle.read(), f"from /etc/ld.so.conf, as {key}'s trigger runs it"


class _Ldconfig(TriggerCache):
    def claims(self, change: Change) -> bool:
        return change.path == b"/etc/ld.so.cache"


def trigger_caches() -> list[TriggerCache]:
    """The cache kinds of this module."""
    return [
        TriggerCache("gdk-pixbuf-query-loaders", b"loaders.cache", _pixbuf,
                     lambda cache: os.path.join(os.path.dirname(cache), b"loaders")),
        TriggerCache("gio-querymodules", b"giomodule.cache", _gio),
        TriggerCache("glib-compile-schemas", b"gschemas.compiled", _schemas),
        _Ldconfig("ldconfig", b"ld.so.cache", _ldconfig, lambda _: b"ldconfig"),
    ]
