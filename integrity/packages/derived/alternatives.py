"""update-alternatives links: vouched for when dpkg's alternatives database says the
link must point exactly where it does.

`/var/lib/dpkg/alternatives/NAME` (what `update-alternatives --query` reads) holds a
group's mode, its generic link and slave links, and every choice with its priority and
slave files. From it:

- the generic link (`/usr/bin/figlet`) must point to `/etc/alternatives/figlet`, a
  slave's (`/usr/share/man/man6/figlet.6.gz`) to `/etc/alternatives/figlet.6.gz`
  when the selected choice has that slave, and neither exists once the group is gone;
- `/etc/alternatives/NAME` must point to the selected choice: in auto mode a choice of
  the highest priority (the current one among equals, as update-alternatives keeps
  it); in manual mode only the choice already there (a changed manual selection is a
  person's `--set`, not a package's); a slave to that choice's slave file;
- the choice must be a file an installed package ships (a group registered by hand
  for /usr/local/bin/evil does not pass);
- a link being made (added, or pointed elsewhere) passes only when a package run since
  the baseline can have made it: dpkg's log shows the selected choice's package
  installed or upgraded since (its postinst registers the group), or the selection
  fell back because the choice the baseline selected is gone (no longer a choice, no
  package ships it) and dpkg logged a removal or upgrade since. update-alternatives
  run by hand writes the same database, so agreeing with it is not enough: a group
  registered by hand (`--install /any/path name /usr/bin/dash 50`) stays open.

Added, modified and removed links are judged alike; the link's owner must be root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from integrity.packages.common import Verdict
from integrity.packages.derived.common import Change, Context, link_verdict
from integrity.paths import display

NAME = "alternatives"
TOOL = "update-alternatives"
ALTDIR = b"/etc/alternatives"


@dataclass
class Choice:
    """One alternative of a group: its file, priority and slave files (name -> path)."""

    path: bytes
    priority: int
    slaves: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Group:
    """One alternatives group as dpkg records it."""

    name: bytes
    mode: bytes
    link: bytes
    slaves: list[tuple[bytes, bytes]]
    choices: list[Choice]


def parse_group(name: bytes, data: bytes) -> Group | None:
    """A group from its state file (dpkg's alternative_load format), or None if the
    file is not one."""
    lines = data.split(b"\n")
    try:
        mode, link = lines[0], lines[1]
        at = 2
        slaves = []
        while lines[at]:
            slaves.append((lines[at], lines[at + 1]))
            at += 2
        at += 1
        choices = []
        while at < len(lines) and lines[at]:
            choice = Choice(lines[at], int(lines[at + 1]))
            at += 2
            for slave_name, _ in slaves:
                if lines[at]:
                    choice.slaves[slave_name] = lines[at]
                at += 1
            choices.append(choice)
    except (IndexError, ValueError):
        return None
    if mode not in (b"auto", b"manual") or not link.startswith(b"/"):
        return None
    return Group(name, mode, link, slaves, choices)


def load_groups(admindir: str) -> dict[bytes, Group]:
    """Every group in dpkg's alternatives database."""
    groups: dict[bytes, Group] = {}
    directory = os.path.join(os.fsencode(admindir), b"alternatives")
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return groups
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as handle:
                group = parse_group(name, handle.read())
        except OSError:
            continue
        if group is not None:
            groups[name] = group
    return groups


class Alternatives:
    """The alternatives kind."""

    name = NAME

    def claims(self, change: Change) -> bool:
        if change.path.startswith(ALTDIR + b"/"):
            return True
        return any(rec is not None and rec.type == "symlink"
                   and (rec.link or b"").startswith(ALTDIR + b"/")
                   for rec in (change.old, change.new))

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        groups = load_groups(ctx.managers.admindir)
        names: dict[bytes, tuple[Group, bytes | None]] = {}
        links: dict[bytes, tuple[Group, bytes | None]] = {}
        for group in groups.values():
            names[group.name] = links[group.link] = (group, None)
            for slave_name, slave_link in group.slaves:
                names[slave_name] = links[slave_link] = (group, slave_name)
        verdicts = {}
        for change in changes:
            if change.path.startswith(ALTDIR + b"/"):
                name = change.path[len(ALTDIR) + 1:]
                verdicts[change.path] = self._selection(change, names.get(name), ctx)
            else:
                verdicts[change.path] = self._generic(change, links.get(change.path), ctx)
        return verdicts

    def _generic(self, change: Change, found: tuple[Group, bytes | None] | None,
                 ctx: Context) -> Verdict:
        if found is None:
            return link_verdict(change, None, TOOL, "no alternatives group names this "
                                "link", NAME)
        group, slave = found
        choice, why = _selected(group)
        if slave is None:
            return _by_package(change, group, choice, link_verdict(
                change, ALTDIR + b"/" + group.name, TOOL,
                f"the generic link of {display(group.name)}", NAME), ctx)
        if choice is not None and slave in choice.slaves:
            return _by_package(change, group, choice, link_verdict(
                change, ALTDIR + b"/" + slave, TOOL,
                f"a slave link of {display(group.name)}; {why}", NAME), ctx)
        return link_verdict(change, None, TOOL, f"a slave of {display(group.name)} that "
                            f"the selected choice lacks; {why}", NAME)

    def _selection(self, change: Change, found: tuple[Group, bytes | None] | None,
                   ctx: Context) -> Verdict:
        if found is None:
            return link_verdict(change, None, TOOL, "no alternatives group has this name",
                                NAME)
        group, slave = found
        choice, why = _selected(group)
        if choice is None:
            return Verdict(False, why)
        if group.mode == b"manual" and change.new is not None and (
                change.old is None or change.old.link != change.new.link):
            return Verdict(False, f"{display(group.name)} is set by hand (manual mode): "
                           "a changed selection is a person's choice, not a package's")
        target = choice.path if slave is None else choice.slaves.get(slave)
        if target is not None and change.new is not None and not ctx.owners(target):
            return Verdict(False, f"{display(target)} is not installed by any package "
                           f"({why})")
        return _by_package(change, group, choice, link_verdict(change, target, TOOL, why,
                                                               NAME), ctx)


def _by_package(change: Change, group: Group, choice: Choice | None, verdict: Verdict,
                ctx: Context) -> Verdict:
    """A link being made (added, or pointed elsewhere) that agrees with dpkg's database
    passes only if a package run since the baseline can have made it: update-alternatives
    run by hand writes that database too. Either the selected choice's package was
    installed or upgraded since (its postinst registers the group), or the selection
    fell back because the choice it had is gone with its package."""
    new, old = change.new, change.old
    if not verdict.vouched or new is None or (
            old is not None and old.type == new.type and old.link == new.link):
        return verdict
    if choice is None:
        return Verdict(False, f"{display(group.name)} has no selected choice")
    owners = ctx.owners(choice.path)
    run = ctx.ran_since(owners, "install", "upgrade", of=change)
    if run is not None:
        return Verdict(True, f"{verdict.reason}; {run}", verdict.evidence, verdict.package)
    dropped = _dropped_choice(group, ctx)
    if dropped is not None:
        return Verdict(True, f"{verdict.reason}; {dropped}", verdict.evidence,
                       verdict.package)
    return Verdict(False, f"{display(group.name)} agrees with dpkg's alternatives "
                   f"database, but {owners[0] if owners else 'no package'}, which ships "
                   f"the choice {display(choice.path)}, was not installed or upgraded "
                   f"since {ctx.since_words(change)}: the group was registered or changed "
                   "by hand (update-alternatives), not by a package run")


def _dropped_choice(group: Group, ctx: Context) -> str | None:
    """How the selection fell back after a package run, or None: the baseline selected
    a file that is no longer a choice and no installed package ships, and dpkg logged a
    removal or upgrade since (its prerm drops the choice as its files go)."""
    selection = ctx.changes.get(ALTDIR + b"/" + group.name)
    old = selection.old if selection is not None else None
    if old is None or old.type != "symlink" or not old.link:
        return None
    if any(choice.path == old.link for choice in group.choices) or ctx.owners(old.link):
        return None
    runs = [text for texts in ctx.logged_since("remove", "purge", "upgrade",
                                               of=selection).values()
            for text in texts]
    if not runs:
        return None
    return (f"the choice the baseline selected, {display(old.link)}, is gone with its "
            f"package (dpkg logged {len(runs)} removal(s) or upgrade(s) since: "
            f"{runs[-1]})")


def _selected(group: Group) -> tuple[Choice | None, str]:
    """The choice update-alternatives keeps selected, and how it was chosen."""
    try:
        current: bytes | None = os.readlink(ALTDIR + b"/" + group.name)
    except OSError:
        current = None
    name = display(group.name)
    if not group.choices:
        return None, f"{name} has no choices left"
    if group.mode == b"manual":
        for choice in group.choices:
            if choice.path == current:
                return choice, f"{name} is set by hand to {display(choice.path)}"
        return None, f"{name} is in manual mode but set to no registered choice"
    best = max(choice.priority for choice in group.choices)
    top = [choice for choice in group.choices if choice.priority == best]
    chosen = next((choice for choice in top if choice.path == current), top[0])
    return chosen, f"{name} (auto) selects {display(chosen.path)}, priority {best}"
