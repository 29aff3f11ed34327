"""The scan pipeline gives the same answer in-process and split across workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integrity.paths import to_key
from integrity.policy import parse
from integrity.ops.baseline import build_baseline
from integrity.ops.verify import verify
from integrity.store import Store
from integrity.scan.walker import WalkEntry, walk


@pytest.fixture
def wide_tree(tmp_path: Path) -> Path:
    """Small trees, a fifo, a large file, and one directory with more entries than
    three workers' batches of 512 each: every worker streams several batches, which
    the parent merges back into key order."""
    root = tmp_path / "wide"
    many = root / "many"
    many.mkdir(parents=True)
    for f in range(3200):
        (many / f"{f:04}").write_bytes(b"%d" % f)
    for d in range(7):
        sub = root / f"d{d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(23):
            (sub / f"f{f}.txt").write_bytes(os.urandom(100 + f * 37))
        os.symlink("inner", root / f"d{d}" / "link")
    os.mkfifo(root / "fifo")
    (root / "big").write_bytes(os.urandom(600_000))
    return root


def test_worker_shares_partition_the_walk(wide_tree: Path) -> None:
    policy = parse({"rule": [{"path": str(wide_tree)}]})
    whole = [e.path for e in walk(policy) if isinstance(e, WalkEntry)]
    for parts in (2, 3):
        shares = [[e.path for e in walk(policy, share=(p, parts))
                   if isinstance(e, WalkEntry)] for p in range(parts)]
        assert sorted(sum(shares, []), key=to_key) == whole
        assert len(set(sum(shares, []))) == len(whole)  # no entry twice
        assert all(s == sorted(s, key=to_key) for s in shares)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_baseline_is_the_same_with_any_number_of_workers(
        tmp_path: Path, wide_tree: Path, workers: int) -> None:
    policy = parse({"rule": [{"path": str(wide_tree), "check": "static"}]})
    reference = Store(f"sqlite:///{tmp_path}/ref.db")
    build_baseline(lambda: reference, policy, parallel=0)
    store = Store(f"sqlite:///{tmp_path}/w{workers}.db")
    info = build_baseline(lambda: store, policy, parallel=workers).baseline
    ref_info = reference.baselines.active()
    assert ref_info is not None
    assert list(store.baselines.entries(info.id)) == list(reference.baselines.entries(ref_info.id))
    (wide_tree / "d3" / "inner" / "f5.txt").write_text("changed")
    (wide_tree / "d5" / "inner" / "f9.txt").unlink()
    result = verify(lambda: store, policy, parallel=workers).result
    assert sorted((os.fsdecode(c.path), c.kind) for c in result.changes) == [
        (str(wide_tree / "d3" / "inner" / "f5.txt"), "modified"),
        (str(wide_tree / "d5" / "inner"), "modified"),
        (str(wide_tree / "d5" / "inner" / "f9.txt"), "removed"),
    ]
