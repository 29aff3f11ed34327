"""Kept content as the use cases need it: what init and approve keep, the diffs verify
records, `integrity diff` and `integrity restore`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from integrity.content.diff import NOT_KEPT_SECRET, unified
from integrity.content.keep import (SECRET, Keeper, Kept, read_live, read_verified,
                                    redaction_key)
from integrity.content.restore import restore_file
from integrity.errors import BaselineError, UsageError
from integrity.ops.seal import check_baseline, effective_policy
from integrity.ops.who import invoking_user, own_actor
from integrity.paths import display, to_key
from integrity.policy import Policy, Rule
from integrity.record import Attr, FileRecord
from integrity.scan import normalize_paths
from integrity.scan.compare import MODIFIED, Change

if TYPE_CHECKING:
    from integrity.store import BaselineInfo, Store
    from integrity.store.events import Actor
    from integrity.store.outbox import Route


class ContentKeeper:
    """What a baseline keeps of files, for one store and policy."""

    def __init__(self, store: Store, policy: Policy) -> None:
        self.store = store
        self.policy = policy
        self._keeper: Keeper | None = None

    @property
    def keeper(self) -> Keeper:
        if self._keeper is None:
            self._keeper = Keeper(self.policy.content,
                                  redaction_key(self.store.sidecar("redact-key")))
        return self._keeper

    def wants(self, rec: FileRecord, rule: Rule | None) -> bool:
        """Whether content would be kept for this record under its rule."""
        return (rule is not None and rule.keeps_texts and rec.type == "file"
                and rec.content is not None and rec.size <= self.policy.content.max_diff_size)

    def keep(self, rec: FileRecord, rule: Rule | None) -> Kept | None:
        """The text kept for a record, read now and only if it is the bytes the scan
        hashed; None for what is not kept (secret, binary, too large, changed since)."""
        if not self.wants(rec, rule):
            return None
        assert rule is not None
        if self.keeper.is_secret_path(rec.path):
            return None  # never even read
        data = read_verified(rec.path, rule.path, rec.content,
                             self.policy.content.max_diff_size)
        if data is None:
            return None
        kept = self.keeper.keep(rec.path, data)
        return kept if isinstance(kept, Kept) else None

    def diffs(self, changes: Sequence[Change], rules: Mapping[bytes, Rule],
              kept: Mapping[bytes, bytes]) -> dict[bytes, str]:
        """Unified diffs (baseline -> live, redacted) of content modifications of kept
        texts; `kept` maps entry keys to the digests their baseline rows name."""
        found: dict[bytes, str] = {}
        for change in changes:
            rule = rules.get(change.path)
            new = change.new
            if (change.kind != MODIFIED or "content" not in change.changed
                    or new is None or not self.wants(new, rule)):
                continue
            assert rule is not None
            if self.keeper.is_secret_path(change.path):
                found[change.path] = NOT_KEPT_SECRET
                continue
            data = read_verified(change.path, rule.path, new.content,
                                 self.policy.content.max_diff_size)
            live = self.keeper.keep(change.path, data) if data is not None else None
            if live == SECRET:
                found[change.path] = NOT_KEPT_SECRET
                continue
            digest = kept.get(to_key(change.path))
            stored = self.store.contents.get(digest) if digest is not None else None
            if isinstance(live, Kept) and stored is not None:
                found[change.path] = unified(self.keeper.rekept(stored[0]), live.text,
                                             display(change.path))
        return found


@dataclass(frozen=True)
class DiffOutcome:
    """`integrity diff PATH`: the diff, or why there is none."""

    path: bytes
    diff: str | None
    reason: str | None


def _checked_baseline(store: Store, policy: Policy) -> BaselineInfo:
    """The baseline in force, its seal checked; BaselineError before the first init."""
    info = check_baseline(store, policy)
    if info is None:
        raise BaselineError(f"{store.name()}: no baseline yet: run 'integrity init'")
    return info


def diff_path(store: Store, policy: Policy, path: str) -> DiffOutcome:
    """Baseline against live for one file (redacted; secrets never shown)."""
    info = _checked_baseline(store, policy)
    sealed = effective_policy(info, policy)
    [target] = normalize_paths(sealed, [path])
    entry = store.baselines.entry(info.id, target)
    keeper = ContentKeeper(store, sealed)
    if entry is None:
        return DiffOutcome(target, None, "not in the baseline")
    _, rec, _, digest = entry
    rule = sealed.rule_for(target)
    if keeper.keeper.is_secret_path(target):
        return DiffOutcome(target, None, NOT_KEPT_SECRET)
    if digest is None:
        return DiffOutcome(target, None, _why_not_kept(keeper, rec, rule))
    stored = store.contents.get(digest)
    assert stored is not None and rule is not None
    data = read_live(target, rule.path, sealed.content.max_diff_size)
    if data is None:
        return DiffOutcome(target, None, "the live file is gone, not a regular file, or "
                                         "larger than max_diff_size")
    live = keeper.keeper.keep(target, data)
    if live == SECRET:
        return DiffOutcome(target, None, NOT_KEPT_SECRET)
    if not isinstance(live, Kept):
        return DiffOutcome(target, None, f"the live file is {live}")
    return DiffOutcome(target, unified(keeper.keeper.rekept(stored[0]), live.text,
                                       display(target)), None)


def _why_not_kept(keeper: ContentKeeper, rec: FileRecord, rule: Rule | None) -> str:
    if rule is None or Attr.DIFF not in rule.check:
        return "content not kept: the rule's check has no 'diff'"
    if rec.type != "file":
        return f"content not kept: a {rec.type}"
    if rec.size > keeper.policy.content.max_diff_size:
        return f"content not kept: larger than max_diff_size ({rec.size} bytes)"
    return "content not kept: not text, or it holds a secret"


@dataclass(frozen=True)
class Restored:
    """One path put back."""

    path: bytes
    event_id: int


def restore(store: Store, policy: Policy, paths: Sequence[str]) -> list[Restored]:
    """Put the baseline's content, mode and owner back (atomically), record it and
    alert it (delivered now unless a watcher delivers).

    Refused (UsageError, exit 2) before anything is written when a path has no kept
    text, or only a redacted one; the baseline's seal is checked first, so a text
    planted in the database is never written to disk.
    """
    from integrity.alerts import build_sinks, routes_of
    from integrity.alerts.dispatch import deliver_after_scan

    sinks = build_sinks(policy)
    try:
        return _restore(store, policy, paths, routes_of(sinks))
    finally:
        deliver_after_scan(store, sinks)


def _restore(store: Store, policy: Policy, paths: Sequence[str],
             routes: Sequence[Route]) -> list[Restored]:
    info = _checked_baseline(store, policy)
    sealed = effective_policy(info, policy)
    targets = normalize_paths(sealed, paths)
    plans = []
    for target in targets:
        entry = store.baselines.entry(info.id, target)
        if entry is None or entry[1].type != "file":
            raise UsageError(f"{display(target)}: not a file in the baseline; nothing to "
                             "restore")
        _, rec, _, digest = entry
        if digest is None:
            raise UsageError(f"{display(target)}: no content was kept for it "
                             f"({_why_not_kept(ContentKeeper(store, sealed), rec, sealed.rule_for(target))}); "
                             "cannot restore")
        stored = store.contents.get(digest)
        assert stored is not None
        text, redacted = stored
        if redacted or digest != rec.content:
            raise UsageError(f"{display(target)}: kept with redacted values, so it cannot "
                             "be restored exactly; restore it from a backup")
        rule = sealed.rule_for(target)
        assert rule is not None
        plans.append((target, rule, rec, text))
    done = []
    user, sudo = invoking_user()
    actor: Actor = own_actor("integrity restore", user, sudo)
    for target, rule, rec, text in plans:
        restore_file(target, rule.path, text, rec)
        done.append(Restored(target, store.events.restored(target, actor, routes=routes)))
    return done
