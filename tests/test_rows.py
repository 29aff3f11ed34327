"""The scale work of issue 13 that is not timed: Merkle leaves added in blocks, free
pages given back and the WITHOUT ROWID entry table.

Speed itself lives in benchmarks/bench_baseline.py; these assert that the faster
ways give exactly what the plain ways give.
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from conftest import child_pids, database_at
from integrity.ops.baseline import build_baseline
from integrity.ops.seal import KeptTexts, SealedIndex, check_root
from integrity.ops.seal_reader import SealReader, SealReaderFailed
from integrity.ops.verify import verify
from integrity.policy import Policy, parse
from integrity.store import Store
from integrity.trust import (LEAF_BATCH, EntriesRoot, MerkleRoot, TrustError, block_leaf,
                             encode_rows, leaf, root_of, row_leaves)
from integrity import trust


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 64, 1000, 1023, 1024, 1025, 5000])
def test_merkle_add_many_gives_the_root_of_add(count: int) -> None:
    rng = random.Random(count)
    leaves = [rng.randbytes(32) for _ in range(count)]
    one = MerkleRoot()
    for digest in leaves:
        one.add(digest)
    many = MerkleRoot()
    i = 0
    while i < count:  # blocks of any size, in any alignment
        step = rng.randint(1, 700)
        many.add_many(leaves[i:i + step])
        i += step
    assert many.count == one.count == count
    assert many.hexdigest() == one.hexdigest()


def random_rows(rng: random.Random, count: int) -> list[tuple[object, ...]]:
    """Rows laid out as stored, with every kind of value a column can hold."""
    def number() -> int:
        return rng.choice([0, 1, -1, 1 << 31, -(1 << 31), (1 << 31) - 1, (1 << 64) - 1,
                           -(10 ** 19), rng.getrandbits(rng.randint(1, 70))])

    def blob() -> bytes | None:
        return rng.choice([None, b"", rng.randbytes(32), rng.randbytes(rng.randint(1, 300))])

    return [(b"/%d\x00\xff" % i + rng.randbytes(rng.randint(0, 40)),
             rng.choice(["file", "dir", "symlink", "\u00e9t\u00e9"]), blob(),
             *[number() for _ in range(8)], blob(), blob(), number(),
             rng.choice([None, "coreutils", "libc6:amd64", "f\u00fcr"]), blob())
            for i in range(count)]


def test_the_block_encoding_is_the_documented_format() -> None:
    """encode_rows (marshal's version 2 format, in C) writes byte for byte what the
    Python spelling of the format writes, for every kind of value a row holds; and
    one row's bytes are pinned here, so a Python whose marshal changes is caught."""
    rng = random.Random(3)
    for count in (0, 1, 2, 50):
        rows = random_rows(rng, count)
        assert encode_rows(rows) == trust._encode_reference(rows)
    assert encode_rows([(b"/a", "file", None, 5, -1, 1 << 40)]) == (
        b"[\x01\x00\x00\x00(\x06\x00\x00\x00s\x02\x00\x00\x00/au\x04\x00\x00\x00fileN"
        b"i\x05\x00\x00\x00i\xff\xff\xff\xffl\x03\x00\x00\x00\x00\x00\x00\x00\x00\x04")
    odd = [(b"", "\udcff", True, False, memoryview(b"xy"), -(1 << 31) - 1)]
    assert encode_rows(odd) == trust._encode_reference(odd)
    with pytest.raises(TypeError, match="float"):
        trust._encode_reference([(1.5,)])


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, LEAF_BATCH - 1, LEAF_BATCH, LEAF_BATCH + 1, 3000])
def test_a_root_is_the_same_whatever_batches_its_rows_come_in(
        version: int, count: int) -> None:
    """The seal reader adds rows a fetch at a time, init a batch at a time, an
    in-process verify an entry at a time: every way gives the same root."""
    from integrity.paths import from_key
    from integrity.record import FileRecord

    rng = random.Random(count)
    rows = random_rows(rng, count)
    entries = [(row[0], FileRecord(from_key(row[0]), *row[1:14]), row[14], row[15])  # type: ignore[arg-type]
               for row in rows]
    mixed = EntriesRoot(version)
    i = 0
    while i < count:
        step = rng.randint(1, 1500)
        if rng.random() < 0.3:
            for entry in entries[i:i + step]:
                mixed.add(*entry)  # type: ignore[arg-type]
        else:
            mixed.add_rows(rows[i:i + step])
        i += step
    expected = root_of(entries, version)  # type: ignore[arg-type]
    assert mixed.hexdigest() == expected
    if version == 3 and count:  # a leaf per block of LEAF_BATCH rows, cut at fixed counts
        merkle = MerkleRoot()
        for start in range(0, count, LEAF_BATCH):
            merkle.add(block_leaf(rows[start:start + LEAF_BATCH]))
        assert merkle.hexdigest() == expected
    if version == 2 and count:
        assert root_of(entries, 3) != expected  # type: ignore[arg-type]


def test_bytes_and_nulls_are_stored_as_blobs_and_nulls(tmp_path: Path) -> None:
    """The store binds bytes and None through identity adapters (engine.py): paths,
    digests and link targets are still BLOBs, absent values NULLs, and read back equal."""
    etc, data = kept_and_packaged_policy(tmp_path)
    os.symlink(b"target\xff", etc / "link")
    db = tmp_path / "types.db"
    store = Store(f"sqlite:///{db}")
    try:
        info = build_baseline(lambda: store, parse(data), parallel=0).baseline
        entries = {rec.path: rec for _, rec, _, _ in store.baselines.entries(info.id)}
    finally:
        store.close()
    assert entries[os.fsencode(etc / "link")].link == b"target\xff"
    with sqlite3.connect(db) as conn:
        kinds = dict(conn.execute(
            "SELECT type, typeof(key) || typeof(content) || typeof(link) FROM entry "
            "WHERE type IN ('file', 'symlink') GROUP BY type"))
    assert kinds == {"file": "blobblobnull", "symlink": "blobnullblob"}


def test_a_baseline_of_an_unknown_seal_version_is_refused(tmp_path: Path) -> None:
    """A seal version this integrity does not know is not checked as some other."""
    _, data = kept_and_packaged_policy(tmp_path)
    policy = parse(data)
    db = tmp_path / "unknown.db"
    store = Store(f"sqlite:///{db}")
    try:
        build_baseline(lambda: store, policy, parallel=0)
        store.close()
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE baseline SET seal_version = 4")
        with pytest.raises(TrustError, match="seal version 4"):
            verify(lambda: store, policy, parallel=0)
    finally:
        store.close()


def kept_and_packaged_policy(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A tree with a kept text (config keeps small texts) and a dpkg-owned tree."""
    etc = tmp_path / "etc"
    (etc / "sub").mkdir(parents=True)
    (etc / "app.conf").write_text("listen = 80\n")
    (etc / "sub" / "other.conf").write_text("mode = strict\n")
    (etc / "blob").write_bytes(os.urandom(3000))
    return etc, {"rule": [{"path": str(etc), "check": "config"},
                          {"path": "/usr/share/doc/dpkg", "check": "static"}]}


@pytest.mark.parametrize("parallel", [0, 2])
def test_init_seals_in_blocks_what_verify_reads_leaf_by_leaf(
        tmp_path: Path, parallel: int) -> None:
    """The seal init makes (leaves added LEAF_BATCH at a time) is the root of the rows
    as stored, every entry's package and kept text included: verify accepts it."""
    _, data = kept_and_packaged_policy(tmp_path)
    policy = parse(data)
    store = Store(f"sqlite:///{tmp_path}/leaves.db")
    try:
        info = build_baseline(lambda: store, policy, parallel=parallel).baseline
        entries = list(store.baselines.entries(info.id))
        assert any(package == "dpkg" for _, _, package, _ in entries)
        assert any(kept is not None for _, _, _, kept in entries)
        check_root(info, root_of(entries))  # TrustError if a leaf differed
        assert verify(lambda: store, policy, parallel=parallel).result.changes == []
    finally:
        store.close()


def test_row_leaves_are_the_leaves_of_the_entries(tmp_path: Path) -> None:
    """The seal reader's batch leaves (over the driver's raw rows) are leaf() of each
    entry as verify reads it: package owners and kept texts included."""
    _, data = kept_and_packaged_policy(tmp_path)
    store = Store(f"sqlite:///{tmp_path}/leaves.db")
    try:
        build_baseline(lambda: store, parse(data), parallel=0)
        with store.baselines.snapshot() as snap:
            entries = list(snap.entries())
            rows = [row for batch in snap.row_batches(7) for row in batch]
    finally:
        store.close()
    assert any(package is not None for _, _, package, _ in entries)
    assert any(kept is not None for _, _, _, kept in entries)
    assert [row[0] for row in rows] == [key for key, _, _, _ in entries]
    assert row_leaves(rows) == [leaf(*entry) for entry in entries]


def test_the_seal_reader_hands_over_the_rows_it_sealed(tmp_path: Path) -> None:
    """A child reads the baseline in its own transaction and checks the seal; the
    rows it hands over are the entries, kept texts noted, and it leaves no process."""
    _, data = kept_and_packaged_policy(tmp_path)
    store = Store(f"sqlite:///{tmp_path}/reader.db")
    try:
        info = build_baseline(lambda: store, parse(data), parallel=0).baseline
        expected = list(store.baselines.entries(info.id))
        before = child_pids()
        with SealReader(store) as reader:
            assert reader.pid in child_pids() - before
            assert reader.info == info
            got = []
            for key, rec in reader.entries():
                got.append((key, rec))
                reader.kept.judged(rec.path, changed=True)
            assert reader.sealed
            reader.finish()  # nothing left to take: the verdict is in
        assert child_pids() <= before
        assert got == [(key, rec) for key, rec, _, _ in expected]
        assert reader.kept.changed == {key: kept for key, _, _, kept in expected if kept}
    finally:
        store.close()


def test_a_seal_reader_that_fails_says_why_and_leaves_no_process(tmp_path: Path) -> None:
    """The child's own error (here: no baseline yet) comes back as one message, and
    the child is reaped although no `with` block was entered."""
    store = Store(f"sqlite:///{tmp_path}/empty.db")
    before = child_pids()
    try:
        with pytest.raises(SealReaderFailed, match="no baseline yet"):
            SealReader(store)
    finally:
        store.close()
    assert child_pids() <= before


def _sealed_by_the_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> tuple[Path, Policy, Path, Store]:
    """The kept-and-packaged tree, its policy, a database for it and its store, with
    the seal reader used from the first entry (verify with parallel=2)."""
    monkeypatch.setattr("integrity.ops.verify.SEAL_READER_MIN", 0)
    etc, data = kept_and_packaged_policy(tmp_path)
    db = tmp_path / "sealed.db"
    return etc, parse(data), db, Store(f"sqlite:///{db}")


@pytest.mark.parametrize("column", ["size", "package", "kept", "delete"])
def test_a_verify_on_two_cores_refuses_an_edited_row(
        tmp_path: Path, column: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify with workers seals the baseline in the reader (from any size here): an
    edit of any column, or a deleted row, is refused as tampering and recorded."""
    etc, policy, db, store = _sealed_by_the_reader(tmp_path, monkeypatch)
    try:
        build_baseline(lambda: store, policy, parallel=0)
        assert verify(lambda: store, policy, parallel=2).result.changes == []
        store.close()
        with sqlite3.connect(db) as conn:
            key = bytes(os.fsencode(etc / "app.conf")).replace(b"/", b"\x00")
            edit = {"size": "UPDATE entry SET size = size + 1 WHERE key = ?",
                    "package": "UPDATE entry SET package = 'dpkg' WHERE key = ?",
                    "kept": "UPDATE entry SET kept = NULL WHERE key = ?",
                    "delete": "DELETE FROM entry WHERE key = ?"}[column]
            assert conn.execute(edit, (key,)).rowcount == 1
        with pytest.raises(TrustError, match="tampering"):
            verify(lambda: store, policy, parallel=2)
        warnings = [e for e in store.events.list() if e["classification"] == "tampering"]
        assert len(warnings) == 1 and warnings[0]["severity"] == "critical"
    finally:
        store.close()


@pytest.mark.parametrize("parallel", [0, 2])
@pytest.mark.parametrize("version", [1, 2])
def test_an_older_seal_still_verifies_and_catches_an_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int, parallel: int) -> None:
    """A baseline sealed before seal version 3, with version 1 (a root over the
    entries' attributes alone) or version 2 (a leaf per entry), is checked with its own
    leaves, by the seal reader and in-process alike, and an edited row is refused."""
    from dataclasses import replace

    from integrity.ops.seal import root_statement
    from integrity.store.ledger import journal

    etc, policy, db, store = _sealed_by_the_reader(tmp_path, monkeypatch)
    try:
        info = build_baseline(lambda: store, policy, parallel=0).baseline
        assert info.seal_version == 3
        entries_root = root_of(store.baselines.entries(info.id), version)
        root = entries_root if version == 1 else root_statement(
            replace(info, seal_version=version), entries_root)
        store.close()
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE baseline SET seal_version = ?, root = ?", (version, root))
            if version == 1:  # sealed no policy
                conn.execute("UPDATE baseline SET policy = NULL")
            conn.execute("DELETE FROM ledger")  # the row changed: entered anew below
        with store.writer() as conn, conn.begin():
            journal(conn, "baseline", [info.id])
        assert verify(lambda: store, policy, parallel=parallel).result.changes == []
        assert SealedIndex.build(store, policy) is not None  # the watcher's check too
        store.close()
        with sqlite3.connect(db) as conn:
            key = bytes(os.fsencode(etc / "blob")).replace(b"/", b"\x00")
            assert conn.execute("UPDATE entry SET mtime = mtime + 1 WHERE key = ?",
                                (key,)).rowcount == 1
        with pytest.raises(TrustError, match="tampering"):
            verify(lambda: store, policy, parallel=parallel)
        with pytest.raises(TrustError, match="tampering"):
            SealedIndex.build(store, policy)
    finally:
        store.close()


def test_kept_texts_hold_only_what_the_scan_has_not_judged() -> None:
    """Digests wait in key order until their entry is judged: a changed entry's is
    kept for its diff, an unchanged one's goes, and so does any passed over (an entry
    not compared: no longer covered, or unreadable)."""
    kept = KeptTexts()
    for name in (b"a", b"b", b"c", b"d", b"e"):
        kept.add(b"\x00etc\x00" + name, name * 32)
    kept.judged(b"/etc/a", changed=False)
    kept.judged(b"/etc/c", changed=True)  # b was never judged: gone with it
    assert kept.changed == {b"\x00etc\x00c": b"c" * 32}
    assert [key for key, _ in kept._pending] == [b"\x00etc\x00d", b"\x00etc\x00e"]
    kept.judged(b"/etc/ca", changed=True)  # no kept text of its own
    kept.judged(b"/etc/e", changed=True)
    assert kept.changed == {b"\x00etc\x00c": b"c" * 32, b"\x00etc\x00e": b"e" * 32}
    assert not kept._pending


@pytest.mark.parametrize("reader", [False, True])
def test_a_diff_is_found_among_many_kept_texts(
        tmp_path: Path, reader: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify (in-process, and with the seal reader) keeps the kept-text digests of
    the files it finds modified, wherever they are among thousands kept, and shows
    their diffs."""
    monkeypatch.setattr("integrity.ops.verify.SEAL_READER_MIN", 0 if reader else 10**9)
    etc = tmp_path / "etc"
    for d in range(20):
        (etc / f"d{d:02d}").mkdir(parents=True)
        for f in range(100):
            (etc / f"d{d:02d}" / f"f{f:03d}.conf").write_text(f"option{f} = {d}\n")
    policy = parse({"rule": [{"path": str(etc), "check": "config"}]})
    store = Store(f"sqlite:///{tmp_path}/kept.db")
    try:
        build_baseline(lambda: store, policy, parallel=0)
        changed = [etc / "d00" / "f000.conf", etc / "d07" / "f050.conf",
                   etc / "d19" / "f099.conf"]
        for path in changed:
            path.write_text(path.read_text().replace("=", "= changed"))
        found = verify(lambda: store, policy, parallel=2)
    finally:
        store.close()
    assert sorted(c.path for c in found.result.changes) == sorted(
        os.fsencode(p) for p in changed)
    assert sorted(found.diffs) == sorted(os.fsencode(p) for p in changed)
    for path in changed:
        assert "+option" in found.diffs[os.fsencode(path)]


def pages(db: Path) -> tuple[int, int, int, int]:
    """(page size, auto_vacuum mode, page count, free pages) of a SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0] for name in (  # type: ignore[return-value]
            "page_size", "auto_vacuum", "page_count", "freelist_count"))
    finally:
        conn.close()


def test_init_force_leaves_one_generation_of_pages(tmp_path: Path) -> None:
    """A retired generation's pages are given back: init --force does not make the
    database grow by a generation (SPEC: bytes per entry of the baseline in force)."""
    root = tmp_path / "t"
    root.mkdir()
    for i in range(3000):
        (root / f"file-with-a-longer-name-{i:05d}").write_bytes(b"x" * (i % 50))
    policy = parse({"rule": [{"path": str(root), "check": "static"}]})
    db = tmp_path / "size.db"
    store = Store(f"sqlite:///{db}")
    try:
        _, vacuum, empty, _ = pages(db)  # the schema, no baseline yet
        assert vacuum == 2  # incremental
        build_baseline(lambda: store, policy, parallel=0)
        _, _, first, _ = pages(db)
        generation = first - empty
        for _ in range(3):
            build_baseline(lambda: store, policy, parallel=0, force=True)
        _, _, count, free = pages(db)
        assert free == 0
        # Kept pages would add a generation per --force (3 here). What may remain is
        # B-tree fill: a generation written beside the one it retires splits pages
        # at other points than the first, append-only build (a few percent, varying
        # with the key bytes, so with the path of tmp_path), and the ledger's record
        # of each generation.
        assert count - first <= generation // 8, (empty, first, count)
        assert store.baselines.require().generation == 4
        assert verify(lambda: store, policy, parallel=0).result.changes == []
    finally:
        store.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:  # the retired generations' rows went with them
        assert conn.execute("SELECT count(DISTINCT baseline_id) FROM entry").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM baseline").fetchone() == (1,)
    finally:
        conn.close()


def test_upgrade_rebuilds_entries_without_rowid_keeping_rows_and_triggers(
        tmp_path: Path) -> None:
    """A database of revision 0011 (no auto_vacuum, a rowid entry table, the fleet
    spool's triggers on it) keeps its rows and triggers through the upgrade and comes
    out with incremental vacuum and the entry table as its key's B-tree."""
    from integrity.store.engine import HEAD
    from integrity.store.spool import TRIGGERS

    db = tmp_path / "old.db"
    with database_at(db, "0011") as conn:
        for ddl in TRIGGERS.values():
            conn.exec_driver_sql(ddl)
        conn.exec_driver_sql(
            "INSERT INTO baseline (id, state, created, activated, policy_source, "
            "policy_digest, entries) VALUES (1, 'active', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00', 'old.toml', 'x', 2)")
        for name, package, kept in ((b"a", "dpkg", None), (b"b", None, b"k" * 32)):
            conn.exec_driver_sql(
                "INSERT INTO entry (baseline_id, key, type, size, mode, uid, gid, inode, "
                "nlink, mtime, ctime, dev, package, kept) "
                "VALUES (1, ?, 'file', 1, 420, 0, 0, 1, 1, 1, 1, 1, ?, ?)",
                (b"\x00t\x00" + name, package, kept))
        conn.exec_driver_sql("DELETE FROM fleet_entry")
    assert pages(db)[1] == 0
    store = Store(f"sqlite:///{db}", check_schema=False)
    try:
        assert store.upgrade() == ("0011", HEAD)
        assert [(k, package, kept) for k, _, package, kept in store.baselines.entries(1)] \
            == [(b"\x00t\x00a", "dpkg", None), (b"\x00t\x00b", None, b"k" * 32)]
    finally:
        store.close()
    assert pages(db)[1] == 2
    conn = sqlite3.connect(db)
    try:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'entry'").fetchone()[0]
        triggers = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        # The spool's entry triggers still fire on the rebuilt table.
        conn.execute("DELETE FROM entry WHERE key = ?", (b"\x00t\x00a",))
        spooled = conn.execute("SELECT baseline_id, key FROM fleet_entry").fetchall()
        conn.rollback()
    finally:
        conn.close()
    assert sql.rstrip().endswith("WITHOUT ROWID")
    assert triggers == set(TRIGGERS)
    assert spooled == [(1, b"\x00t\x00a")]
