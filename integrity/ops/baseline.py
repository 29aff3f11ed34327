"""Init: walk and hash every rule's tree into a new baseline generation, sealed.

The workers start hashing before the database is opened; the entries' Merkle root is
computed from the records as they stream into the store, and the generation becomes
the baseline in force only once every row is written, sealed with the policy, its
generation number and its activation time (store.baselines.write). Inits and
approvals of one database take turns (store.exclusive): two at once never leave it
without a baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from integrity.errors import ScanWarning, UsageError
from integrity.ops.content import ContentKeeper
from integrity.ops.seal import init_sealer
from integrity.policy import Policy
from integrity.policy.sealed import sealed_text
from integrity.scan import Progress, TreeScan
from integrity.trust import LEAF_BATCH, EntriesRoot, signer_of

if TYPE_CHECKING:
    from integrity.store import BaselineInfo, Store
    from integrity.store.baseline import Row


@dataclass
class InitResult:
    """A freshly written baseline and the warnings met on the way."""

    baseline: BaselineInfo
    warnings: list[ScanWarning]


def build_baseline(open_store: Callable[[], Store], policy: Policy, *,
                   force: bool = False, actor: str | None = None,
                   progress: Progress | None = None, parallel: bool | int | None = None,
                   sign_key: str | None = None) -> InitResult:
    """Walk and hash every rule's tree and make it the baseline, atomically."""
    if policy.public_key and not sign_key:
        raise UsageError(f"{policy.source}: public_key is configured: the baseline must "
                         "be signed (--sign-key FILE)")
    if sign_key:
        signer_of(sign_key)  # a bad key fails now, not after the whole scan
    warnings: list[ScanWarning] = []
    # The leaves are made here, not in the workers: on two cores the workers are the
    # critical path, and a million-file init was ~1 s slower with the leaves there.
    with TreeScan(policy, parallel=parallel,
                  max_read_rate=policy.scan.max_read_rate) as scan:
        live = scan.live()
        store = open_store()
        owner = package_owner(policy)
        entries_root = EntriesRoot()
        text = sealed_text(policy)
        keeper = ContentKeeper(store, policy)
        from integrity.store.contents import PendingTexts

        pending = PendingTexts()

        def rows() -> Iterator[Row]:
            # Each row is laid out as stored (trust.row_of, spelled out: once per
            # file), which is also what a leaf is made of: a batch at a time.
            batch: list[Row] = []
            for key, item in live:
                if isinstance(item, ScanWarning):
                    warnings.append(item)
                    continue
                if item.problem is not None:
                    warnings.append(item.problem)
                rec = item.record
                if rec is not None:
                    if progress is not None:
                        progress.add(rec.size)
                    package = owner(rec.path) if owner is not None else None
                    kept = keeper.keep(rec, item.rule) if keeper.wants(rec, item.rule) \
                        else None
                    if kept is not None:
                        # Stored with the rows, in the generation's transaction.
                        pending.add(kept.digest, kept.text, kept.redacted)
                    row = (key, *rec[1:], package,
                           kept.digest if kept is not None else None)
                    batch.append(row)
                    if len(batch) >= LEAF_BATCH:
                        entries_root.add_rows(batch)
                        batch = []
                    yield row
            entries_root.add_rows(batch)

        with store.exclusive():
            info = store.baselines.write(
                rows(), policy_source=policy.source, policy_digest=policy.digest,
                sealed_policy=text, actor=actor, force=force,
                seal=init_sealer(sign_key, entries_root, text), texts=pending)
    return InitResult(info, warnings)


def package_owner(policy: Policy) -> Callable[[bytes], str | None] | None:
    """Who installed a path (dpkg/rpm), recorded with each entry; None when no
    package owns anything under the policy's rules (or there is no package manager)."""
    from integrity.packages import PackageManagers

    managers = PackageManagers()
    owners = managers.owner_map(policy.bases)
    if not owners:
        return None
    canonical = managers.canonical
    return lambda path: owners.get(canonical(path))
