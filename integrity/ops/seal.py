"""The seal over a baseline: made when a generation is written, checked before any
of its rows is trusted, and pinned from off the host.

A baseline's root (trust.seal) covers every entry column, the sealed policy, the
generation number and the activation time. Every verify recomputes it over the rows it
reads (`SealCheck` watches the entry stream go by; on several cores a whole-tree
verify has `seal_reader.SealReader` read and seal them in a child), approvals check
it inside their own write transaction, and the watcher keeps a small `SealedIndex` so
that a realtime re-check of one path verifies that path's rows without reading the
whole baseline.
Pins an operator keeps elsewhere: the root (`--expect-root`), the signing key's
fingerprint (`--expect-key`) and the head of the event chain (`--expect-head`).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import blake3

from integrity.errors import IntegrityError
from integrity.paths import display, from_key, to_key
from integrity.policy import Policy
from integrity.policy.sealed import as_sealed, sealed_digest, sealed_text
from integrity.record import FileRecord
from integrity.trust import (EMPTY_ROOT, EntriesRoot, TrustError, check_signature,
                             encode_rows, fingerprint, public_key_bytes, root_of, row_of,
                             seal, sign, signature_valid, signer_of)

if TYPE_CHECKING:
    from integrity.store import Store
    from integrity.store.baseline import BaselineInfo, Entries, Entry, Sealed, Snapshot


@dataclass(frozen=True)
class Pins:
    """What the operator keeps off the host; each one that is given must hold."""

    root: str | None = None
    key: str | None = None
    head: str | None = None


class KeptTexts:
    """The kept-text digests of baseline entries streaming past a scan, each held
    until the scan has judged its entry: a changed entry's stays (its diff needs it),
    the others go. Memory follows the scan's read-ahead, not the baseline: 100,000
    kept texts held to the end cost the watcher's catch-up scan 20 MiB.

    Entries are added and judged in key order (the merge's), so whatever is still
    pending ahead of a judged key was never compared (not covered, or unreadable).
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[bytes, bytes]] = deque()
        #: key -> kept-text digest, of the entries the scan found changed.
        self.changed: dict[bytes, bytes] = {}

    def add(self, key: bytes, digest: bytes) -> None:
        """An entry with kept text has streamed past."""
        self._pending.append((key, digest))

    def judged(self, path: bytes, changed: bool) -> None:
        """The scan compared the entry at `path` (scanner.Judged)."""
        pending = self._pending
        if not pending:
            return
        key = to_key(path)
        while pending and pending[0][0] <= key:
            first, digest = pending.popleft()
            if changed and first == key:
                self.changed[key] = digest


class SealCheck:
    """Computes a baseline's entries root from its rows as they stream past."""

    def __init__(self, info: BaselineInfo) -> None:
        self.info = info
        self._root = EntriesRoot(info.seal_version)
        #: The kept text digests, for the diffs of what the scan finds changed.
        self.kept = KeptTexts()

    def stream(self, entries: Entries) -> Iterator[tuple[bytes, FileRecord]]:
        """The (key, record) pairs the scan wants, each entering the root on the way."""
        keep = self.kept.add
        add = self._root.add
        for key, rec, package, text in entries:
            add(key, rec, package, text)
            if text is not None:
                keep(key, text)
            yield key, rec

    def consume(self, entries: Entries) -> None:
        """Take a whole stream without passing it on."""
        for _ in self.stream(entries):
            pass

    def finish(self) -> None:
        """Raise TrustError unless everything streamed hashes to the recorded root."""
        check_root(self.info, self._root.hexdigest())


def check_root(info: BaselineInfo, entries_root: str) -> None:
    """Raise TrustError unless entries with this Merkle root match the baseline's seal."""
    expected = info.root
    actual = root_statement(info, entries_root)
    if expected is None or actual != expected:
        raise TrustError(
            f"baseline generation {info.generation}: its entries or sealed policy hash "
            f"to {actual}, not to the recorded root {expected}: the baseline was "
            "changed outside integrity (tampering)")


def root_statement(info: BaselineInfo, entries_root: str) -> str:
    """The root a baseline must have, given the root of its entries."""
    if info.seal_version < 2 or info.policy is None:
        return entries_root
    return seal(entries_root, sealed_digest(info.policy), info.generation, info.created)


def verify_seal(info: BaselineInfo, entries: Entries) -> None:
    """Raise TrustError unless `entries` (all of the baseline's rows) match its seal."""
    check = SealCheck(info)
    check.consume(entries)
    check.finish()


@overload
def effective_policy(info: BaselineInfo, policy: Policy) -> Policy: ...
@overload
def effective_policy(info: BaselineInfo, policy: None) -> Policy | None: ...
def effective_policy(info: BaselineInfo, policy: Policy | None) -> Policy | None:
    """The policy a baseline is verified with: the one sealed with it (the file's
    schedule, sinks and database), whatever the policy file says now; without a
    usable policy file, the sealed policy alone."""
    if info.policy is None:
        return policy
    if policy is not None and info.policy == sealed_text(policy):
        return policy
    try:
        return as_sealed(policy, info.policy)
    except (ValueError, TypeError, AttributeError, IntegrityError) as exc:
        # integrity only ever seals a policy it validated: this one was written here
        raise TrustError(f"baseline generation {info.generation}: its sealed policy is "
                         f"not a policy integrity sealed ({exc}): the baseline was "
                         "changed outside integrity (tampering)") from None


def check_pins(info: BaselineInfo, sealed: Policy | None, pins: Pins = Pins(),
               current: Policy | None = None) -> None:
    """The signature the sealed policy (and a policy file that adds a key) asks for,
    and the operator's root and key pins."""
    root = info.root or EMPTY_ROOT
    if pins.root is not None and root != pins.root.strip().lower():
        raise TrustError(f"baseline root {root} is not the expected {pins.root}: the "
                         "baseline was replaced or changed (tampering)")
    keys = {p.public_key for p in (sealed, current) if p is not None and p.public_key}
    for public_key in sorted(keys):
        check_signature(root, info.signature, public_key)
        if info.signer is not None and info.signer != public_key_bytes(public_key):
            raise TrustError(f"baseline root {root} was signed by "
                             f"{fingerprint(info.signer)}, not by the key in "
                             f"{public_key} (tampering)")
    if pins.key is not None:
        wanted = pins.key.strip()
        if info.signature is None or info.signer is None:
            raise TrustError(f"baseline root {root} is not signed; expected a signature "
                             f"by {wanted} (tampering, or signing was never set up)")
        if fingerprint(info.signer) != wanted:
            raise TrustError(f"baseline root {root} is signed by "
                             f"{fingerprint(info.signer)}, not by {wanted} (tampering)")
        if not signature_valid(root, info.signature, info.signer):
            raise TrustError(f"baseline root {root}: its signature does not verify "
                             "(tampering)")


def check_head(store: Store, head: str | None) -> None:
    """Refuse an event chain in which the kept head is neither the head nor an
    ancestor: history was rolled back or rewritten before it."""
    if head is not None and not store.ledger.contains(head):
        raise TrustError(f"event chain does not contain the kept head {head.strip()}: "
                         "the database was rolled back or its history rewritten "
                         f"(head now {store.ledger.head()}) (tampering)")


def check_baseline(store: Store, policy: Policy, pins: Pins = Pins()) -> BaselineInfo | None:
    """Verify the baseline in force against its seal and the pins (TrustError, exit
    2); returns it. Reads every entry: run before trusting a baseline."""
    check_head(store, pins.head)
    with store.baselines.snapshot() as snap:
        info = snap.info
        if info is None:
            return None
        verify_seal(info, snap.entries())
    check_pins(info, effective_policy(info, policy), pins, policy)
    return info


def init_sealer(sign_key: str | None, entries: EntriesRoot, policy_text: str
                ) -> Callable[[int, dt.datetime], Sealed]:
    """The seal of a new generation whose rows went into `entries`."""
    def make(generation: int, activated: dt.datetime) -> Sealed:
        root = seal(entries.hexdigest(), sealed_digest(policy_text), generation, activated)
        return _signed(root, sign_key)
    return make


def approval_sealer(sign_key: str | None
                    ) -> Callable[[Entries, int, dt.datetime, str], Sealed]:
    """The seal of the generation an approval writes, from its rows as they stand."""
    def make(entries: Entries, generation: int, activated: dt.datetime,
             policy_text: str) -> Sealed:
        root = seal(root_of(entries), sealed_digest(policy_text), generation, activated)
        return _signed(root, sign_key)
    return make


def _signed(root: str, sign_key: str | None) -> Sealed:
    if sign_key is None:
        return root, None, None
    return root, sign(root, sign_key), signer_of(sign_key)


class StaleIndex(IntegrityError):
    """The baseline in force is not the one a SealedIndex verified: build it again."""


class SealedIndex:
    """What the watcher remembers of a verified baseline: the digest of each block of
    `BLOCK` consecutive entries and the first key of each, a few hundred KB for a
    million entries. A re-check reads just the blocks its paths fall in and compares
    them, so a row edited, inserted or deleted since the seal was verified is caught
    before it is trusted."""

    BLOCK = 256

    def __init__(self, info: BaselineInfo) -> None:
        self.info = info
        self.firsts: list[bytes] = []
        self.digests: list[bytes] = []

    @classmethod
    def build(cls, store: Store, policy: Policy) -> SealedIndex | None:
        """Verify the baseline in force (seal, signature) and index it; None before init."""
        with store.baselines.snapshot() as snap:
            info = snap.info
            if info is None:
                return None
            return cls._indexed(info, snap.entries(), policy)

    @classmethod
    def _indexed(cls, info: BaselineInfo, entries: Entries, policy: Policy) -> SealedIndex:
        index = cls(info)
        root = EntriesRoot(info.seal_version)
        block: list[tuple[object, ...]] = []
        for entry in entries:
            if len(block) == cls.BLOCK:
                index.digests.append(_block_digest(block))
                root.add_rows(block)
                block = []
            if not block:
                index.firsts.append(entry[0])
            block.append(row_of(*entry))
        if block:
            index.digests.append(_block_digest(block))
            root.add_rows(block)
        check_root(info, root.hexdigest())
        check_pins(info, effective_policy(info, policy), current=policy)
        return index

    def current(self, store: Store) -> bool:
        """Whether the baseline in force is still the one indexed (else an approval or
        a new init happened: build again)."""
        info = store.baselines.active()
        return info is not None and _sealed_fields(info) == _sealed_fields(self.info)

    def entries(self, store: Store, ranges: Sequence[tuple[bytes, bytes]]) -> list[Entry]:
        """The baseline's entries within key ranges, from blocks that still match
        what was verified; TrustError naming the first block that does not."""
        wanted: set[int] = set()
        for low, high in ranges:
            first = bisect.bisect_right(self.firsts, low) - 1
            last = bisect.bisect_left(self.firsts, high) - 1
            wanted.update(range(max(first, -1), max(last, -1) + 1))
        with store.baselines.snapshot() as snap:
            now = snap.info
            if now is None or _sealed_fields(now) != _sealed_fields(self.info):
                raise StaleIndex("the baseline changed (an approval or init) since it "
                                 "was indexed")
            return self._verified(snap, sorted(wanted), ranges)

    def _verified(self, snap: Snapshot, wanted: list[int],
                  ranges: Sequence[tuple[bytes, bytes]]) -> list[Entry]:
        found: list[Entry] = []
        for i in wanted:
            low = self.firsts[i] if i >= 0 else b""
            high = self.firsts[i + 1] if i + 1 < len(self.firsts) else b"\xff" * 8
            rows = list(snap.entries([(low, high)]))
            digest = _block_digest([row_of(*e) for e in rows])
            if (digest != self.digests[i]) if i >= 0 else bool(rows):
                asked = [lo for lo, hi in ranges if lo < high and hi > low] or [low]
                raise TrustError(f"baseline entries around {display(from_key(asked[0]))} "
                                 "changed since the seal was verified: the baseline was "
                                 "changed outside integrity (tampering)")
            found += [e for e in rows if any(lo <= e[0] < hi for lo, hi in ranges)]
        return found


def _sealed_fields(info: BaselineInfo) -> tuple[object, ...]:
    """What a SealedIndex verified of the baseline row besides its entries: a row in
    force that differs (an approval, or its sealed policy edited behind our back) is
    indexed, and so checked against its seal, again."""
    return (info.id, info.generation, info.root, info.policy, info.signature, info.signer)


def _block_digest(rows: list[tuple[object, ...]]) -> bytes:
    """What SealedIndex remembers of a block of entries (every column of each)."""
    return blake3.blake3(encode_rows(rows)).digest()


def describe_key(path: str) -> str:
    """`integrity key fingerprint`: a key file's fingerprint (public or private)."""
    try:
        return fingerprint(public_key_bytes(path))
    except IntegrityError:
        return fingerprint(signer_of(path))
