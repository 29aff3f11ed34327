"""Approvals: accept the current state of paths into the baseline, and say why.

An approval re-reads only the paths it approves (never the whole tree), writes their
state into the active baseline and closes their events in one transaction. The
package-update mode approves exactly what the package manager vouches for and
returns the reason for everything it left open.
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from integrity.errors import BaselineError, ScanWarning, UsageError
from integrity.ops.baseline import package_owner
from integrity.ops.content import ContentKeeper
from integrity.ops.seal import (approval_sealer, check_baseline, check_pins,
                                effective_policy, verify_seal)
from integrity.ops.who import invoking_user
from integrity.paths import key_range, to_key
from integrity.policy import Policy
from integrity.record import Attr, FileRecord
from integrity.scan import normalize_paths, read_state
from integrity.scan.compare import diff
from integrity.scan.walker import lstat_in_tree
from integrity.store import BaselineInfo, Store
from integrity.store.baseline import Entries, Entry
from integrity.store.events import PACKAGE_UPDATE, UNEXPLAINED, OpenEvent
from integrity.trust import signer_of

if TYPE_CHECKING:
    from integrity.packages import PackageManagers, Verdict

#: Attributes that change whenever a package manager replaces a file: explained by
#: the content verdict. Mode and ownership need evidence of their own.
_REPLACEMENT = {"content", "size", "type", "link", "inode", "nlink", "mtime", "ctime",
                "dev"}
_OWNERSHIP = {"mode", "uid", "gid"}
#: Every attribute: an approval writes the whole entry, so every difference counts.
_ALL = Attr(sum(a.value for a in Attr if a is not Attr.GROWING))


def _vouch_added(managers: PackageManagers, path: bytes, new: FileRecord,
                 since: float) -> Verdict:
    """An added path passes on its content, and on its attributes where the package
    states them; where it states none, only in the shape a package gives by default:
    root's, neither setuid, setgid, sticky nor world-writable, no extended attributes.
    `since`: when the path was last seen as recorded (absent)."""
    from integrity.packages import LiveFile, Verdict

    if new.xattrs is not None:
        return Verdict(False, "package managers do not state extended attributes")
    content = managers.check_content(path, LiveFile(path, new), since)
    if not content.vouched:
        return content
    attributes = managers.check_attributes(path, new.mode, new.uid, new.gid, since)
    if attributes.vouched:
        return _all_of([content, attributes])
    if not attributes.unstated:
        return attributes  # the package states other attributes
    special = new.mode & 0o7000 or (new.mode & 0o002 and new.type != "symlink")
    if (new.uid, new.gid) == (0, 0) and not special:
        return content
    return Verdict(False, f"added as {new.mode:04o} {new.uid}:{new.gid}, and the "
                          f"{attributes.reason}", None, attributes.package)


def _all_of(verdicts: list[Verdict]) -> Verdict:
    """The first verdict that does not vouch, else one vouching at the weakest
    evidence of them all."""
    from integrity.packages import Verdict

    for verdict in verdicts:
        if not verdict.vouched:
            return verdict
    levels = {v.evidence for v in verdicts}
    weakest = "package-db" if "package-db" in levels else verdicts[-1].evidence
    return Verdict(True, verdicts[-1].reason, weakest, verdicts[-1].package)


@dataclass(frozen=True)
class Approved:
    """One approved path: the change it had and the evidence it rested on."""

    path: bytes
    kind: str
    evidence: str | None


@dataclass(frozen=True)
class LeftOpen:
    """An open change that was not approved, and why."""

    path: bytes
    kind: str
    reason: str


@dataclass
class ApprovalOutcome:
    """What an approval did."""

    approval_id: int | None = None
    approved: list[Approved] = field(default_factory=list)
    left_open: list[LeftOpen] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    root: str | None = None


def _unchanged_since(rec: FileRecord, policy: Policy) -> bool:
    """The entry still has the identity and times it had when it was read."""
    rule = policy.rule_for(rec.path)
    if rule is None:
        return False
    try:
        # From the rule's root one directory at a time, like the walk that read it:
        # a path beyond PATH_MAX, and never through a directory swapped for a link.
        st = lstat_in_tree(rec.path, rule.path)
    except OSError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
        rec.inode, rec.size, rec.mtime, rec.ctime)


def _reread(policy: Policy, store: Store, baseline_id: int, path: bytes, subtree: bool,
            known: dict[bytes, Entry] | None = None,
            ) -> tuple[list[FileRecord], list[bytes], list[ScanWarning]]:
    """Live state of one path (or its subtree) against the baseline: what to write.
    `known` holds the baseline's entries of paths already fetched (path alone only)."""
    low, high = key_range(path) if subtree else (to_key(path), to_key(path) + b"\x00")
    if known is not None and not subtree:
        old = {low: known[path][1]} if path in known else {}
    else:
        old = {key: rec for key, rec, _, _ in store.baselines.entries(baseline_id,
                                                                      [(low, high)])}
    records, problems = read_state(policy, path, subtree)
    upserts = [rec for rec in records if old.pop(to_key(rec.path), None) != rec]
    deletes = [rec.path for rec in old.values()]
    return upserts, deletes, problems


class Approver:
    """Approves changes against one store and policy."""

    def __init__(self, store: Store, policy: Policy, *, reason: str | None = None,
                 sign_key: str | None = None) -> None:
        baseline = store.baselines.require()
        #: What is approved follows the policy sealed with the baseline; the policy
        #: file, if it differs, is only accepted by `approve --policy`.
        self.file_policy = policy
        self.policy = effective_policy(baseline, policy)
        if (self.policy.public_key or policy.public_key) and not sign_key:
            raise UsageError(f"{policy.source}: public_key is configured: approvals must "
                             "be signed (--sign-key FILE)")
        if sign_key:
            signer_of(sign_key)  # a bad key fails now, before anything is re-read
        self.store = store
        self.baseline = baseline
        self.reason = reason
        self.sign_key = sign_key

    def paths(self, paths: Sequence[str | bytes]) -> ApprovalOutcome:
        """Approve the named paths, each with its whole subtree."""
        targets = normalize_paths(self.policy, paths)
        if not targets:
            raise UsageError("approve: name PATHs, or use --all or --package-updates")
        events = self.store.events.open([key_range(p) for p in targets])
        return self._commit([(p, True) for p in targets], events, "paths")

    def all(self) -> ApprovalOutcome:
        """Approve every path that has an open event (each path itself)."""
        events = self.store.events.open()
        return self._commit([(e.path, False) for e in events], events, "all")

    def accept_policy(self) -> ApprovalOutcome:
        """Seal the policy file as the baseline's policy (`approve --policy`).

        Entries the new policy covers and the sealed one did not are read in (as
        init would), entries it no longer covers are dropped, and the open policy
        events are closed. Every other difference stays open: accepting a policy
        never approves a change of a file both policies protect.
        """
        from integrity.ops.seal import SealCheck
        from integrity.policy.sealed import sealed_text
        from integrity.scan import TreeScan
        from integrity.scan.compare import ADDED

        new, old = self.file_policy, self.policy
        text = sealed_text(new)
        rekept, deletes = self._recorded_under(new)
        if self.baseline.policy == text and self.baseline.seal_version >= 2 and not rekept:
            return ApprovalOutcome()
        with TreeScan(new) as scan:
            sealing = SealCheck(self.baseline)
            result = scan.compare(sealing.stream(
                self.store.baselines.entries(self.baseline.id)))
            sealing.finish()
        unread = {w.path for w in result.warnings}
        upserts = [c.new for c in result.changes if c.kind == ADDED and c.new is not None
                   and not old.covers(c.path) and c.path not in unread]
        scanned = {u.path for u in upserts}
        upserts += [rec for rec in rekept if rec.path not in scanned]
        events = self.store.events.open_policy_changes()
        outcome = self._write(upserts, deletes, events, {}, "policy", UNEXPLAINED,
                              package_owner(new), policy=text)
        outcome.left_open = [LeftOpen(w.path, "unreadable", f"{w.operation} failed: "
                                      f"{w.cause}") for w in result.warnings
                             if not old.covers(w.path)]
        return outcome

    def _recorded_under(self, policy: Policy) -> tuple[list[FileRecord], list[bytes]]:
        """What the baseline holds that `policy` would record otherwise, in one pass
        over its entries: (records to write again, paths it no longer covers).

        The first are baseline records (as they are: nothing is approved) whose kept
        text the policy's `[content]` would not keep as it is: a path it names secret
        now, a rule without `diff`, a value a new `redact` pattern hides. `[content]` is
        not sealed (it applies to every output at once); written again by the approval,
        their text is kept as init would keep it now, from the live file while it is
        still the baseline's, or not at all (a redacted text is judged by the live file
        only while that is the baseline's): a credential the operator has just named
        secret must not stay in the database, nor reach a diff from the baseline side.
        """
        from integrity.content.keep import Kept, read_verified

        keeper = ContentKeeper(self.store, policy)
        found: list[FileRecord] = []
        uncovered: list[bytes] = []
        for _, rec, _, digest in self.store.baselines.entries(self.baseline.id):
            if not policy.covers(rec.path):
                uncovered.append(rec.path)
                continue
            if digest is None:
                continue  # most entries: no text kept
            rule = policy.rule_for(rec.path)
            if keeper.keeper.is_secret_path(rec.path) or not keeper.wants(rec, rule):
                found.append(rec)
                continue
            assert rule is not None
            stored = self.store.contents.get(digest)
            data = stored[0] if stored is not None and not stored[1] else read_verified(
                rec.path, rule.path, rec.content, policy.content.max_diff_size)
            if data is None:
                continue  # redacted, and the file changed since: nothing to judge by
            now = keeper.keeper.keep(rec.path, data)
            if not isinstance(now, Kept) or now.digest != digest:
                found.append(rec)
        return found, uncovered

    def package_updates(self, managers: PackageManagers | None = None,
                        require_signed: bool = False) -> ApprovalOutcome:
        """Approve exactly the open changes a package manager vouches for.

        Each path is re-read first and judged on how its state *now* differs from
        the baseline (not on what the verify saw), and what is written is exactly
        the state that was judged: a chmod made after the verify cannot ride along
        with an upgrade. With `require_signed` (or the sealed policy's `[packages]
        require_signed`) only the signed archive vouches for content and attributes.
        """
        from integrity.packages import PackageManagers, Verdict
        from integrity.packages.derived import Change, rejudge

        if managers is None:
            managers = PackageManagers(
                baseline_check=self.baseline_check,
                require_signed=require_signed or self.policy.packages.require_signed)
        since = calendar.timegm(self.baseline.created.utctimetuple())
        chosen: list[OpenEvent] = []
        evidence: dict[int, str | None] = {}
        left: list[LeftOpen] = []
        upserts: list[FileRecord] = []
        deletes: list[bytes] = []
        judged: list[tuple[OpenEvent, list[FileRecord], list[bytes], Change]] = []
        events = self.store.events.open()
        known = self.store.baselines.entries_at(self.baseline.id, [e.path for e in events])
        # A package run explains a change only if it came after the path was last
        # seen as recorded: an upgrade approved last week vouches for nothing made by
        # hand since.
        seen = self.store.events.seen_as_recorded(events, self.baseline.id,
                                                  self.baseline.created)
        for event in events:
            recorded = calendar.timegm(seen[event.id].utctimetuple())
            ups, dels, problems = _reread(self.policy, self.store, self.baseline.id,
                                          event.path, False, known)
            if problems:
                left.append(LeftOpen(event.path, event.kind, f"cannot read: "
                                     f"{problems[0].operation} failed: {problems[0].cause}"))
                continue
            entry = known.get(event.path)
            old, package = (entry[1], entry[2]) if entry is not None else (None, None)
            new = ups[0] if ups else None
            judged.append((event, ups, dels, Change(
                event.path, old, new,
                self._vouch(managers, event.path, old, new, recorded, package),
                recorded)))
        # Derived files (bytecode, alternatives, trigger caches...) are judged as a
        # batch: a .pyc needs its source's verdict, a cache is made once.
        verdicts = rejudge(managers, [change for *_, change in judged], since=since)
        for (event, ups, dels, change), verdict in zip(judged, verdicts):
            new = change.new
            if (verdict.vouched and new is not None
                    and not _unchanged_since(new, self.policy)):
                verdict = Verdict(False, "changed again while it was being approved")
            if verdict.vouched:
                chosen.append(event)
                evidence[event.id] = verdict.evidence
                upserts += ups
                deletes += dels
            else:
                left.append(LeftOpen(event.path, event.kind, verdict.reason))
        outcome = self._write(upserts, deletes, chosen, evidence, "package-updates",
                              PACKAGE_UPDATE, managers.owner)
        outcome.left_open = left
        return outcome

    def baseline_check(self, path: str, data: bytes) -> str | None:
        """None when `data` is what the baseline recorded for the file at `path`, else
        why not. apt's keyrings, gpgv, dpkg-deb and the libraries they load are
        root-writable: a key signs package lists, and a tool's verdict counts, only as
        they were when the baseline was taken or approved."""
        import blake3

        raw = os.fsencode(path)
        entry = self.store.baselines.entries_at(self.baseline.id, [raw]).get(raw)
        if entry is None:
            return "not in the integrity baseline (protect it with a rule)"
        rec = entry[1]
        if rec.type != "file" or rec.content is None:
            return (f"the baseline records no content of it (a {rec.type}"
                    f"{'' if rec.type != 'file' else ' whose rule does not hash content'})")
        if blake3.blake3(data).digest() != rec.content:
            return "differs from the integrity baseline"
        return None

    def _vouch(self, managers: PackageManagers, path: bytes, old: FileRecord | None,
               new: FileRecord | None, since: float, package: str | None) -> Verdict:
        """The package manager's verdict on how path differs from the baseline now
        (every part must hold); `package` is the owner the baseline recorded."""
        from integrity.packages import LiveFile, Verdict

        if new is None and old is None:
            return Verdict(True, "no longer differs from the baseline")
        if new is None:
            assert old is not None
            return managers.check_removed(path, since, package)
        if old is None:
            return _vouch_added(managers, path, new, since)
        changed = set(diff(old, new, _ALL))
        if not changed:
            return Verdict(True, "no longer differs from the baseline")
        if "xattrs" in changed:
            return Verdict(False, "package managers do not state extended attributes")
        if new.type == old.type == "file" and new.inode == old.inode \
                and new.nlink > old.nlink:
            # dpkg and rpm install a file under a new inode; a link to the old one is
            # someone's (a setuid binary kept alive past its upgrade, say).
            return Verdict(False, f"a hard link was made to it (links {old.nlink} -> "
                                  f"{new.nlink}, the same inode): no package run does that")
        verdicts = []
        if changed & _REPLACEMENT:
            # The bytes judged must be those recorded (see LiveFile).
            verdicts.append(managers.check_content(path, LiveFile(path, new), since))
        if changed & _OWNERSHIP:
            verdicts.append(managers.check_attributes(path, new.mode, new.uid, new.gid,
                                                      since))
        return _all_of(verdicts)

    def _commit(self, targets: list[tuple[bytes, bool]], events: Sequence[OpenEvent],
                mode: str) -> ApprovalOutcome:
        """Re-read the targets and write what a person approved."""
        upserts: list[FileRecord] = []
        deletes: list[bytes] = []
        failed: set[bytes] = set()
        left: list[LeftOpen] = []
        for path, subtree in targets:
            ups, dels, problems = _reread(self.policy, self.store, self.baseline.id,
                                          path, subtree)
            if problems:
                # Never write a half-read state into the baseline.
                failed.add(path)
                first = problems[0]
                left.append(LeftOpen(path, "unreadable",
                                     f"{first.operation} failed: {first.cause}"))
                continue
            upserts += ups
            deletes += dels
        closing = [e for e in events
                   if not any(e.path == f or e.path.startswith(f + b"/") for f in failed)]
        outcome = self._write(upserts, deletes, closing, {}, mode, UNEXPLAINED,
                              package_owner(self.policy))
        outcome.left_open = left
        return outcome

    def _check_seal(self, info: BaselineInfo, entries: Entries) -> None:
        """Inside the approval's write transaction: the rows it is about to re-root
        still match their seal, and the baseline is still the one the changes were
        read against (an init may have replaced it meanwhile)."""
        if info.id != self.baseline.id:
            raise BaselineError("the baseline was replaced while approving (a new init); "
                                "nothing was approved: run the approval again")
        verify_seal(info, entries)
        check_pins(info, effective_policy(info, self.file_policy),
                   current=self.file_policy)

    def _write(self, upserts: list[FileRecord], deletes: list[bytes],
               events: Sequence[OpenEvent], evidence: dict[int, str | None], mode: str,
               classification: str, owner: Callable[[bytes], str | None] | None,
               policy: str | None = None) -> ApprovalOutcome:
        """One transaction: baseline rows, the approval, its events."""
        outcome = ApprovalOutcome()
        closing = {e.id: evidence.get(e.id) for e in events}
        if not upserts and not deletes and not closing and policy is None:
            check_baseline(self.store, self.file_policy)  # nothing to do, on a sound seal
            return outcome
        user, sudo_user = invoking_user()
        keeper = ContentKeeper(self.store, self.policy if policy is None else
                               self.file_policy)
        rules = self.policy if policy is None else self.file_policy
        kept = {}
        for rec in upserts:
            text = keeper.keep(rec, rules.rule_for(rec.path))
            if text is not None:
                kept[rec.path] = (text.digest, text.text, text.redacted)
        with self.store.exclusive():
            outcome.approval_id, after = self.store.approvals.apply(
                upserts=upserts, deletes=deletes, events=closing, user=user,
                sudo_user=sudo_user, reason=self.reason, mode=mode,
                check=self._check_seal, seal=approval_sealer(self.sign_key),
                policy=policy, classification=classification, owner=owner, kept=kept)
        outcome.root = after.root
        outcome.written = sorted([r.path for r in upserts] + deletes, key=to_key)
        outcome.approved = [Approved(e.path, e.kind, evidence.get(e.id)) for e in events]
        return outcome
