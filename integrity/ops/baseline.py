"""Init: walk and hash every rule's tree into a new baseline generation, sealed.

The workers start hashing before the database is opened; the root is computed from
the records as they stream into the store, and the generation becomes the baseline
in force only once every row is written (store.baselines.write).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from integrity.errors import ScanWarning
from integrity.paths import to_key
from integrity.policy import Policy
from integrity.record import FileRecord
from integrity.scan import Progress, TreeScan
from integrity.trust import MerkleRoot, leaf, sign

if TYPE_CHECKING:
    from integrity.store import BaselineInfo, Store


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
    warnings: list[ScanWarning] = []
    with TreeScan(policy, parallel=parallel) as scan:
        live = scan.live()
        store = open_store()
        owner = package_owner(policy)
        merkle = MerkleRoot()

        def seal() -> tuple[str, bytes | None]:
            root = merkle.hexdigest()
            return root, sign(root, sign_key) if sign_key else None

        def records() -> Iterator[FileRecord]:
            for item in live:
                if isinstance(item, ScanWarning):
                    warnings.append(item)
                    continue
                if item.problem is not None:
                    warnings.append(item.problem)
                if item.record is not None:
                    if progress is not None:
                        progress.add(item.record.size)
                    merkle.add(leaf(to_key(item.path), item.record))
                    yield item.record

        info = store.baselines.write(records(), policy_source=policy.source,
                                     policy_digest=policy.digest, actor=actor,
                                     force=force, owner=owner, seal=seal)
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
