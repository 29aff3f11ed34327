"""Links maintainer-script helpers make for services: deb-systemd-helper, update-rc.d.

**deb-systemd-helper** records every link it enables for a unit in
`/var/lib/systemd/deb-systemd-helper-enabled/UNIT.dsh-also` and marks it enabled with
an empty file at the link's relative path there. A link under /etc/systemd/system
passes when such a record lists it, its marker exists, and the unit file (a file its
package shipped, unchanged) says, through its [Install] section (WantedBy, RequiredBy,
Alias, Also, DefaultInstance: read as deb-systemd-helper reads it), that the link
points exactly where it does. A link being made (added, or pointed elsewhere) must
also be a package run's: dpkg's log shows the unit's package installed or upgraded
since the baseline, and the enabled marker was made since. deb-systemd-helper makes a
link only for a unit without a marker, and makes the marker with it, so a marker
older than the baseline, which lacked the link, means a person disabled the unit;
re-adding the link (`systemctl enable` by hand) stays open. A mask link (to /dev/null)
passes while deb-systemd-helper's masked state records it; made now, it passes only
when the masked marker was made since the baseline, the unit file is gone, its removal
is in the same approval, and dpkg logged the removal or purge of the package the
baseline recorded as its owner (a mask by hand, of auditd say, stays open). A mask
removed must be its package's run too (installed again, upgraded or purged since), or
leave no unit file to run: an admin's mask removed by hand stays open. A link no
record lists must be gone: a `systemctl disable` by hand leaves the record, so the
removal stays open.

**update-rc.d** (without insserv) links `/etc/rcN.d/S01NAME` for each Default-Start
level of the LSB header of `/etc/init.d/NAME` (K01 for a disabled service) and
`K01NAME` for each Default-Stop level, all to `../init.d/NAME`; the script must be its
package's, unchanged. Once the script is gone, its links must be too. With insserv the
numbers come from its dependency solver, which is not replayed here.
"""

from __future__ import annotations

import os
import re

from integrity.packages.common import Verdict
from integrity.packages.derived.common import (Change, Context, dir_verdict, link_verdict,
                                               not_vouched)
from integrity.paths import display

SYSTEMD_TOOL = "deb-systemd-helper"
SYSV_TOOL = "update-rc.d"
_INSTANCES = {b"system": (b"/var/lib/systemd/deb-systemd-helper-enabled",
                          b"/var/lib/systemd/deb-systemd-helper-masked"),
              b"user": (b"/var/lib/systemd/deb-systemd-user-helper-enabled",
                        b"/var/lib/systemd/deb-systemd-user-helper-masked")}
_UNIT_LINK = re.compile(rb"^/etc/systemd/(system|user)/(.+)$")
_WANTS_DIR = re.compile(rb"^/etc/systemd/(system|user)/[^/]+\.(wants|requires)$")
_RC_LINK = re.compile(rb"^/etc/rc([0-6S])\.d/([SK])(\d\d)(.+)$")
_KEY = re.compile(rb"^\s*(WantedBy|RequiredBy|Also|Alias|DefaultInstance)=(.*)$", re.I)


def _is_link(change: Change) -> bool:
    return any(r is not None and r.type == "symlink" for r in (change.old, change.new))


def _values(text: bytes) -> list[bytes]:
    out = []
    for value in text.split():
        if len(value) >= 2 and value[:1] in (b'"', b"'") and value[-1:] == value[:1]:
            value = value[1:-1]
        out.append(value)
    return out


class SystemdLinks:
    """Unit links deb-systemd-helper (or systemctl preset, which it records) makes."""

    name = SYSTEMD_TOOL

    def claims(self, change: Change) -> bool:
        return bool(_UNIT_LINK.match(change.path) and _is_link(change)) or bool(
            _WANTS_DIR.match(change.path))

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        records = {instance: _records(enabled) for instance, (enabled, _) in
                   _INSTANCES.items()}
        verdicts = {}
        for change in changes:
            match = _UNIT_LINK.match(change.path)
            assert match is not None
            instance, rel = match.group(1), match.group(2)
            listed = records[instance]
            if _WANTS_DIR.match(change.path):
                inside = any(link.startswith(change.path + b"/") for link in listed)
                verdicts[change.path] = dir_verdict(
                    change, inside, SYSTEMD_TOOL, "enabled units' links live in it"
                    if inside else "no enabled unit's link lives in it")
            else:
                verdicts[change.path] = self._link(change, instance, rel, listed, ctx)
        return verdicts

    def _link(self, change: Change, instance: bytes, rel: bytes,
              listed: dict[bytes, list[bytes]], ctx: Context) -> Verdict:
        enabled, masked = _INSTANCES[instance]
        new_link = change.new.link if change.new is not None else None
        # The link is being made (added, or pointed elsewhere), not removed or kept.
        made = change.new is not None and (change.old is None or change.old.type !=
                                           change.new.type or change.old.link != new_link)
        if os.path.lexists(os.path.join(masked, rel)) and b"/" not in rel and (
                change.new is None or new_link == b"/dev/null"):
            why = _masked_by_removal(change, instance, rel, os.path.join(masked, rel),
                                     ctx) if made else None
            if why is not None:
                return Verdict(False, why)
            return link_verdict(change, b"/dev/null", SYSTEMD_TOOL,
                                f"{display(rel)} is masked while its package is removed")
        if change.new is None and change.old is not None \
                and change.old.link == b"/dev/null" and b"/" not in rel:
            # A mask gone: deb-systemd-helper unmasks a unit only from its package's
            # postinst (installed again) or postrm (purged). With no unit file left
            # (purged), nothing was unmasked that could run.
            run = _unmasked_by_package(change, instance, rel, ctx) \
                if _find_unit(instance, rel).startswith(b"/") else "no unit file is left"
            if run is None:
                return Verdict(False, f"the mask of {display(rel)} was removed, but dpkg "
                               "logged no install, upgrade or purge of a package shipping "
                               f"it since {ctx.since_words(change)} (a person's systemctl "
                               "unmask)")
            return link_verdict(change, None, SYSTEMD_TOOL,
                                f"{display(rel)} unmasked by its package's run: {run}")
        units = listed.get(change.path, [])
        if not units:
            return link_verdict(change, None, SYSTEMD_TOOL, "no unit's "
                                f"{SYSTEMD_TOOL} record lists it")
        marker = os.path.join(enabled, rel)
        if not os.path.lexists(marker):
            return Verdict(False, f"{SYSTEMD_TOOL} lists it for {display(units[0])} but "
                           "has not enabled it (no marker in its state)")
        reasons = []
        for unit in units:
            path = _find_unit(instance, unit)
            if not path.startswith(b"/"):
                reasons.append(f"no unit file {display(unit)} is installed to derive it "
                               "from")
                continue
            verdict = ctx.vouched(path)
            if not verdict.vouched:
                reasons.append(not_vouched("the unit file", path, verdict).reason)
                continue
            dest = _closure(instance, unit, path).get(change.path)
            if dest is None:
                reasons.append(f"{display(path)} asks for no such link")
                continue
            how = f"[Install] of {display(path)} ({verdict.reason})"
            if made:
                # deb-systemd-helper makes a link only for a unit with no enabled
                # marker yet, and makes the marker with it; only its package's postinst
                # runs it (a person's `systemctl enable` is no package run).
                owners = ctx.owners(path)
                run = ctx.ran_since(owners, "install", "upgrade", of=change)
                if run is None:
                    return Verdict(False, f"{display(unit)} was enabled, but "
                                   f"{owners[0] if owners else 'no package'} was not "
                                   f"installed or upgraded since {ctx.since_words(change)}: "
                                   "no package run made this link (a person's systemctl "
                                   "enable)")
                if not ctx.made_since(marker, of=change):
                    return Verdict(False, f"{SYSTEMD_TOOL}'s enabled marker "
                                   f"{display(marker)} predates {ctx.since_words(change)}, "
                                   "which did not have this link: a person disabled the "
                                   f"unit, and {SYSTEMD_TOOL} never enables it again, so "
                                   "re-adding the link is a person's systemctl enable")
                how += f"; {run}"
            return link_verdict(change, dest, SYSTEMD_TOOL, how)
        return Verdict(False, "; ".join(reasons))


def _masked_by_removal(change: Change, instance: bytes, unit: bytes, marker: bytes,
                       ctx: Context) -> str | None:
    """Why a mask link (to /dev/null) being made now is not deb-systemd-helper's, or
    None: it masks a unit only from its package's postrm on removal, so the unit file
    must be gone, its removal in this approval, and its package's removal or purge
    logged by dpkg since the baseline (the masked marker made since, too)."""
    name = display(unit)
    found = _find_unit(instance, unit)
    if found.startswith(b"/"):
        return (f"{name} is masked, but its unit file {display(found)} is still "
                "installed: deb-systemd-helper masks a unit only when its package is "
                "removed (a person's systemctl mask)")
    if not ctx.made_since(marker, of=change):
        return (f"{name} is masked, but deb-systemd-helper's masked marker "
                f"{display(marker)} predates {ctx.since_words(change)}")
    owners = _removed_unit_owners(instance, unit, ctx)
    if ctx.ran_since(owners, "remove", "purge", of=change) is not None:
        return None
    if owners:
        return (f"{name} is masked, but {owners[0]}, which shipped it, was not removed "
                f"since {ctx.since_words(change)} (dpkg's log)")
    return (f"{name} is masked, but no removal of its unit file by its package is in this "
            "approval: nothing shows that the package shipping it was removed")


def _unmasked_by_package(change: Change, instance: bytes, unit: bytes,
                         ctx: Context) -> str | None:
    """What dpkg logged since the baseline of installing, upgrading or purging a
    package that ships the unit (installed now, or its unit file's removal in this
    approval), or None."""
    found = _find_unit(instance, unit)
    packages = list(ctx.owners(found)) if found.startswith(b"/") else []
    return ctx.ran_since([*packages, *_removed_unit_owners(instance, unit, ctx)],
                         "install", "upgrade", "purge", of=change)


def _removed_unit_owners(instance: bytes, unit: bytes, ctx: Context) -> list[str]:
    """The packages whose removal of the unit file is in this approval (the owner the
    baseline recorded)."""
    owners = []
    for top in (b"/lib/systemd/", b"/usr/lib/systemd/"):
        gone = ctx.changes.get(top + instance + b"/" + unit)
        if gone is not None and gone.new is None and gone.verdict.package:
            owners.append(gone.verdict.package)
    return owners


def _records(state: bytes) -> dict[bytes, list[bytes]]:
    """link -> units whose .dsh-also record lists it."""
    found: dict[bytes, list[bytes]] = {}
    try:
        names = sorted(os.listdir(state))
    except OSError:
        return found
    for name in names:
        if not name.endswith(b".dsh-also"):
            continue
        try:
            with open(os.path.join(state, name), "rb") as handle:
                lines = handle.read().split(b"\n")
        except OSError:
            continue
        for line in lines:
            if line:
                found.setdefault(line, []).append(name[:-len(b".dsh-also")])
    return found


def _find_unit(instance: bytes, unit: bytes) -> bytes:
    """Where deb-systemd-helper finds a unit file (its find_unit)."""
    for top in (b"/etc/systemd/", b"/lib/systemd/", b"/usr/lib/systemd/"):
        path = top + instance + b"/" + unit
        if os.path.isfile(path):
            return path
    return unit


def _closure(instance: bytes, unit: bytes, path: bytes,
             visited: list[bytes] | None = None) -> dict[bytes, bytes]:
    """link -> target for every link enabling a unit (deb-systemd-helper's
    get_link_closure)."""
    visited = [] if visited is None else visited
    links: dict[bytes, bytes] = {}
    wants: list[bytes] = []
    name = os.path.basename(path)
    wanted = name
    try:
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
    except OSError:
        return links
    top = b"/etc/systemd/" + instance + b"/"
    for line in lines:
        match = _KEY.match(line)
        if not match:
            continue
        key, values = match.group(1).lower(), _values(match.group(2))
        if key in (b"wantedby", b"requiredby"):
            suffix = b".wants/" if key == b"wantedby" else b".requires/"
            wants += [top + value + suffix for value in values]
        elif key == b"also":
            for value in values:
                if value != name and value not in visited:
                    visited.append(value)
                    links.update(_closure(instance, value, _find_unit(instance, value),
                                          visited))
        elif key == b"alias":
            links.update((top + value, path) for value in values if value != name)
        elif key == b"defaultinstance" and values:
            wanted = re.sub(rb"^(.*@)(\.\w+)$", lambda m: m.group(1) + values[0] +
                            m.group(2), name)
    links.update((d + wanted, path) for d in wants)
    return links


class SysvLinks:
    """/etc/rcN.d links update-rc.d makes from an init script's LSB header."""

    name = SYSV_TOOL

    def claims(self, change: Change) -> bool:
        return bool(_RC_LINK.match(change.path)) and _is_link(change)

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        insserv = any(os.access(p, os.X_OK) for p in ("/usr/lib/insserv/insserv",
                                                       "/sbin/insserv")) \
            and os.path.exists("/etc/insserv.conf")
        verdicts = {}
        for change in changes:
            if insserv:
                verdicts[change.path] = Verdict(
                    False, "insserv numbers these links from its dependency solver, "
                    "which is not replayed here")
            else:
                verdicts[change.path] = self._link(change, ctx)
        return verdicts

    def _link(self, change: Change, ctx: Context) -> Verdict:
        match = _RC_LINK.match(change.path)
        assert match is not None
        level, letter, number, name = match.groups()
        script = b"/etc/init.d/" + name
        if not os.path.lexists(script):
            return link_verdict(change, None, SYSV_TOOL, f"{display(script)} is gone")
        live, verdict = ctx.vouched_read(script)
        if live is None:
            return not_vouched("its init script", script, verdict)
        start, stop = _lsb_levels(live.data)
        if number == b"01" and ((letter == b"S" and level in start) or (
                letter == b"K" and (level in stop or level in start))):
            return link_verdict(change, b"../init.d/" + name, SYSV_TOOL,
                                f"Default-Start {b' '.join(start).decode()!r}, "
                                f"Default-Stop {b' '.join(stop).decode()!r} of "
                                f"{display(script)}")
        return link_verdict(change, None, SYSV_TOOL, f"the LSB header of {display(script)}"
                            f" asks for no {letter.decode()}{number.decode()} link in "
                            f"runlevel {level.decode()}")


def _lsb_levels(script: bytes) -> tuple[list[bytes], list[bytes]]:
    """Default-Start and Default-Stop of an LSB header (update-rc.d's parsing)."""
    start: list[bytes] = []
    stop: list[bytes] = []
    inside = False
    for line in script.split(b"\n"):
        if re.match(rb"^### BEGIN INIT INFO\s*$", line):
            inside = True
        elif re.match(rb"^### END INIT INFO\s*$", line):
            break
        elif inside:
            found = re.match(rb"^# Default-(Start|Stop):\s*(.*)$", line)
            if found:
                (start if found.group(1) == b"Start" else stop)[:] = found.group(2).split()
    return start, stop
