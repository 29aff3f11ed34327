"""The seal over a baseline: computed when a baseline is written, checked before it
is trusted.

The Merkle root and signature are pure functions (integrity.trust); this module
applies them to the store's rows: a root and signature for a new generation or an
approval, and the check that refuses a baseline changed outside integrity.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from integrity.policy import Policy
from integrity.record import FileRecord
from integrity.trust import EMPTY_ROOT, TrustError, check_signature, root_of, sign

if TYPE_CHECKING:
    from integrity.store import Store
    from integrity.store.baseline import Seal


def sealer(sign_key: str | None) -> Seal:
    """A store Seal: the root of the entries it is given, signed with `sign_key`."""
    def seal(entries: Iterator[tuple[bytes, FileRecord]]) -> tuple[str, bytes | None]:
        root = root_of(entries)
        return root, sign(root, sign_key) if sign_key else None
    return seal


def check_baseline(store: Store, policy: Policy, expect_root: str | None = None) -> str:
    """Refuse (TrustError, exit 2) a baseline that does not hash to its recorded root,
    to `expect_root`, or (with the policy's public key) to a root that key signed.
    Returns the root. Reads every entry: run before trusting a baseline."""
    baseline = store.baselines.active()
    if baseline is None:
        return EMPTY_ROOT
    actual = root_of(store.baselines.entries(baseline.id))
    if baseline.root is not None and actual != baseline.root:
        raise TrustError(f"baseline entries hash to {actual}, not to their recorded root "
                         f"{baseline.root}: the baseline was changed outside integrity")
    if expect_root is not None and actual != expect_root.strip().lower():
        raise TrustError(f"baseline root {actual} is not the expected {expect_root}: "
                         "the baseline was replaced or changed")
    if policy.public_key:
        check_signature(actual, baseline.signature, policy.public_key)
    return actual
