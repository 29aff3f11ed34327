"""Derived files: vouched for by making them again, never by being near a package run.

After a package run, files that no package ships have changed with the packages: the
bytecode py3compile writes, update-alternatives' links, caches that triggers
regenerate, links maintainer-script helpers make. `rejudge` is asked once per
approval with every open change and the package managers' verdict on each; for a
change no package owns it finds the kind that claims it and lets that kind make the
file again from vouched-for inputs (each file or cache once, tools and compilers in
parallel) and compare. The evidence names how: ``derived:python-bytecode``,
``derived:alternatives``, ``derived:<tool>``. What no kind can make again keeps the
package managers' verdict, with the reason a known generated file cannot be derived
(an initramfs, say) added.

Under ``require_signed`` every input must be vouched by the signed archive (the
package managers then vouch for nothing weaker), and the kinds that decide from dpkg's
own root-writable state (the alternatives database, deb-systemd-helper's records)
vouch for nothing.

Kinds: `bytecode` (Python), `alternatives` (update-alternatives), `caches`
(gdk-pixbuf-query-loaders, gio-querymodules, glib-compile-schemas, ldconfig),
`datacaches` (update-mime-database, gtk-update-icon-cache, fc-cache), `services`
(deb-systemd-helper, update-rc.d), `cacerts` (update-ca-certificates).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from integrity.packages.common import Verdict
from integrity.packages.derived.common import Change, Context, Kind, evidence
from integrity.packages.derived.sandbox import Sandbox

if TYPE_CHECKING:
    from integrity.packages import PackageManagers

__all__ = ["Change", "rejudge", "kinds", "evidence"]

#: Generated files nothing here can make again, and what to do about them.
_UNDERIVABLE: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"^/boot/initrd\.img-"),
     "an initramfs is built by update-initramfs from the whole system (kernel modules, "
     "hooks, configuration) and cannot be made again here: see the README on approving "
     "it after a kernel update"),
    (re.compile(rb"^/boot/grub/grub\.cfg$"),
     "update-grub generates it from /etc/default/grub and the installed kernels; it is "
     "not made again here: read it and approve it by name"),
    (re.compile(rb"^(/usr)?/lib/modules/[^/]+/modules\.[a-z.]+$"),
     "a kernel module index written by depmod; it is not made again here"),
    (re.compile(rb"^/etc/ssh/ssh_host_"),
     "a host key is generated, not derived: there is nothing to make it again from"),
)

#: Kinds (by name) that decide from state no signature covers, and what state.
_UNSIGNED_STATE = {"alternatives": "dpkg's alternatives database",
                   "deb-systemd-helper": "deb-systemd-helper's records"}


def kinds() -> list[Kind]:
    """Every kind of derived file, in the order they are asked to claim a change."""
    from integrity.packages.derived.alternatives import Alternatives
    from integrity.packages.derived.bytecode import Bytecode
    from integrity.packages.derived.cacerts import CaCertificates
    from integrity.packages.derived.caches import trigger_caches
    from integrity.packages.derived.datacaches import data_caches
    from integrity.packages.derived.services import SystemdLinks, SysvLinks

    return [Bytecode(), Alternatives(), *trigger_caches(), *data_caches(), SystemdLinks(),
            SysvLinks(), CaCertificates()]


def rejudge(managers: PackageManagers, changes: Sequence[Change],
            use: Sequence[Kind] | None = None, since: float | None = None) -> list[Verdict]:
    """The final verdict on each change of one approval, in order; `since` is when the
    baseline was taken (unix time): links a maintainer script made pass only when
    dpkg logged that package's run after it.

    A change the package managers vouch for, or a path an installed package lists,
    keeps their verdict: a package's own file is judged against the package, never
    re-derived. The others are judged by the kind that claims them.
    """
    claimed: dict[int, list[Change]] = {}
    pool = list(kinds() if use is None else use)
    candidates = [c for c in changes if not c.verdict.vouched]
    sandbox: Sandbox | None = None
    results: dict[bytes, Verdict] = {}
    if candidates:
        ctx = Context(managers, changes, since)
        sandbox = ctx.sandbox
        for change in candidates:
            if ctx.owners(change.path):
                continue
            for index, kind in enumerate(pool):
                if kind.claims(change):
                    claimed.setdefault(index, []).append(change)
                    break
        if managers.require_signed:
            for index in [i for i in claimed if pool[i].name in _UNSIGNED_STATE]:
                why = (f"{pool[index].name} decides from {_UNSIGNED_STATE[pool[index].name]}"
                       f", which no signature covers, and --require-signed asks for "
                       f"signed evidence")
                results.update((c.path, Verdict(False, why)) for c in claimed.pop(index))
        try:
            with ThreadPoolExecutor(max(1, len(claimed))) as threads:
                done = threads.map(lambda item: _judge(pool[item[0]], item[1], ctx),
                                   claimed.items())
                for verdicts in done:
                    results.update(verdicts)
        finally:
            sandbox.close()
    return [results.get(c.path) or _explained(c) for c in changes]


def _judge(kind: Kind, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
    """One kind's verdicts; a derivation that fails leaves its files open, saying why,
    and never stops the approval."""
    try:
        return kind.judge(changes, ctx)
    except Exception as exc:  # noqa: BLE001 - any failure means "not vouched for"
        why = f"cannot make it again ({kind.name}): {type(exc).__name__}: {exc}"
        return {c.path: Verdict(False, why) for c in changes}


def _explained(change: Change) -> Verdict:
    """The package managers' verdict, with why a known generated file stays open."""
    verdict = change.verdict
    if verdict.vouched:
        return verdict
    for pattern, why in _UNDERIVABLE:
        if pattern.match(change.path):
            return Verdict(False, f"{verdict.reason}; {why}", None, verdict.package)
    return verdict
