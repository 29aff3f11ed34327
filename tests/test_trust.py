"""Tamper evidence: the baseline's Merkle root, --expect-root, and signed roots."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integrity.paths import to_key
from integrity.record import FileRecord
from integrity.trust import MerkleRoot, leaf, root_of

from conftest import Cli


def record(path: bytes, size: int = 1, content: bytes | None = b"\x01" * 32) -> FileRecord:
    return FileRecord(path, "file", content, size, 0o644, 0, 0, 7, 1, 10, 11, None, None, 2049)


@pytest.mark.parametrize("version", [2, 3])
def test_root_is_deterministic_and_covers_every_field(version: int) -> None:
    entries = [(to_key(p), record(p), "base-files", None) for p in (b"/a", b"/a/b", b"/c")]

    def sealed(given: list[Any]) -> str:
        return root_of(given, version)

    assert sealed(entries) == sealed(list(entries))
    for index in range(1, len(FileRecord._fields)):
        rec = list(entries[1][1])
        rec[index] = b"\x02" * 32 if isinstance(rec[index], bytes) else (
            "dir" if isinstance(rec[index], str) else (rec[index] or 0) + 1)
        changed = [entries[0], (entries[1][0], FileRecord(*rec), "base-files", None),
                   entries[2]]
        assert sealed(changed) != sealed(entries), FileRecord._fields[index]
    # The package owner is sealed too (--package-updates decides by it), and the
    # digest of the kept text (diff and restore read it).
    for package, kept in ((None, None), ("coreutils", None), ("base-files", b"\x03" * 32)):
        changed = [entries[0], (entries[1][0], entries[1][1], package, kept), entries[2]]
        assert sealed(changed) != sealed(entries), package
    assert sealed(entries[:2]) != sealed(entries)          # a removed entry shows
    assert sealed([entries[1], entries[0], entries[2]]) != sealed(entries)  # order counts
    assert sealed([]) == sealed([]) != sealed(entries[:1])


def test_streaming_root_matches_a_plain_merkle_tree() -> None:
    leaves = [leaf(to_key(b"/%d" % i), record(b"/%d" % i), None, None) for i in range(13)]
    merkle = MerkleRoot()
    for digest in leaves:
        merkle.add(digest)
    # Independent model: complete subtrees of powers of two, folded from the right.
    import blake3

    def node(left: bytes, right: bytes) -> bytes:
        return blake3.blake3(b"integrity-node-v1\x00" + left + right).digest()

    def full(items: list[bytes]) -> bytes:
        while len(items) > 1:
            items = [node(items[i], items[i + 1]) for i in range(0, len(items), 2)]
        return items[0]

    parts = [full(leaves[0:8]), full(leaves[8:12]), full(leaves[12:13])]
    expected = node(parts[0], node(parts[1], parts[2]))
    assert merkle.hexdigest() == expected.hex()


def _root(run: Cli) -> str:
    return str(json.loads(run("status", "--json").stdout)["baseline"]["root"])


def _tamper(db: Path, path: Path, back: bool = False) -> None:
    with sqlite3.connect(db) as conn:
        changed = conn.execute("UPDATE entry SET size = size + ? WHERE key = ?",
                               (-1 if back else 1, to_key(os.fsencode(path)))).rowcount
    assert changed == 1


def test_init_prints_the_root_and_verify_checks_it(run: Cli, tree: Path) -> None:
    result = run("init")
    root = _root(run)
    assert len(root) == 64 and f"root {root}" in result.stdout
    assert run("verify", "--expect-root", root).exit_code == 0
    refused = run("verify", "--expect-root", "0" * 64)
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "is not the expected" in refused.stderr


def test_an_edited_baseline_is_refused(run: Cli, tree: Path) -> None:
    run("init")
    root = _root(run)
    _tamper(run.db, tree / "a.conf")
    for command in (["verify", "--expect-root", root], ["approve", "--all"],
                    ["approve", str(tree)]):
        refused = run(*command)
        assert refused.exit_code == 2, command
        assert "changed outside integrity" in refused.stderr
    # The tampered entry was not laundered into a new root by the refused approvals.
    assert _root(run) == root


def test_approve_prints_and_records_the_new_root(run: Cli, tree: Path) -> None:
    run("init")
    before = _root(run)
    (tree / "a.conf").write_text("changed\n")
    run("verify")
    approved = run("approve", str(tree / "a.conf"))
    after = _root(run)
    assert after != before and f"root {after}" in approved.stdout
    assert run("verify", "--expect-root", after).exit_code == 0


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private = tmp_path / "keys" / "signing.key"
    private.parent.mkdir()
    result = Cli(tmp_path / "unused.db", tmp_path / "none.toml")("key", "generate",
                                                                 str(private))
    assert result.exit_code == 0, result.output
    return private, Path(f"{private}.pub")


def test_key_generate_writes_a_private_key_only_root_can_read(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = Cli(tmp_path / "unused.db", tmp_path / "none.toml")("key", "generate",
                                                                str(private))
    assert again.exit_code == 2 and "not overwriting" in again.stderr


def test_signed_baselines(run: Cli, tree: Path, keys: tuple[Path, Path],
                          write_policy: Callable[..., Path]) -> None:
    private, public = keys
    signed_policy = write_policy({"path": str(tree), "check": "static"},
                                 name="signed.toml")
    signed_policy.write_text(f'public_key = "{public}"\n' + signed_policy.read_text())
    signed = Cli(run.db, signed_policy)
    assert "(signed)" in signed("init", "--sign-key", str(private)).stdout
    assert signed("verify").exit_code == 0
    status = json.loads(signed("status", "--json").stdout)
    assert status["baseline"]["signed"] is True
    (tree / "a.conf").write_text("changed\n")
    assert signed("verify").exit_code == 1
    # With a public key configured, approvals must be signed.
    unsigned = signed("approve", str(tree / "a.conf"))
    assert unsigned.exit_code == 2 and "must be signed" in unsigned.stderr
    approved = signed("approve", str(tree / "a.conf"), "--sign-key", str(private))
    assert approved.exit_code == 0, approved.output
    assert signed("verify").exit_code == 0
    # An unsigned baseline (init under a policy without the key) is refused by a
    # verify whose policy names the key: a key in the file is enforced at once.
    assert run("init", "--force").exit_code == 0
    refused = signed("verify")
    assert refused.exit_code == 2 and "is not signed" in refused.stderr
    assert signed("init", "--force", "--sign-key", str(private)).exit_code == 0
    assert signed("verify").exit_code == 0
    # Another key's signature does not count.
    other = private.parent / "other.key"
    assert Cli(run.db, signed_policy)("key", "generate", str(other)).exit_code == 0
    assert signed("init", "--force", "--sign-key", str(other)).exit_code == 0
    wrong = signed("verify")
    assert wrong.exit_code == 2 and "does not verify" in wrong.stderr
    # The watcher refuses such a baseline too, before it starts watching.
    watch = subprocess.run([sys.executable, "-m", "integrity", "--db", f"sqlite:///{run.db}",
                            "--policy", str(signed_policy), "watch"],
                           capture_output=True, text=True, timeout=60)
    assert watch.returncode == 2
    assert "does not verify" in watch.stderr and "Traceback" not in watch.stderr


def test_public_key_must_be_an_absolute_path(run: Cli, tree: Path) -> None:
    run.policy.write_text('public_key = "relative.pub"\n' + run.policy.read_text())
    result = run("verify")
    assert result.exit_code == 2 and "public_key" in result.stderr


def test_a_version_1_seal_still_verifies_and_approve_policy_seals_it_anew(
        run: Cli, tree: Path) -> None:
    """Baselines written before sealed policies carry a root over their entries
    alone: verify still checks that, and `approve --policy` seals the policy in."""
    from integrity.store import Store

    assert run("init").exit_code == 0
    store = Store(f"sqlite:///{run.db}")
    try:
        info = store.baselines.require()
        old_root = root_of(store.baselines.entries(info.id), 1)
    finally:
        store.close()
    with sqlite3.connect(run.db) as conn:
        conn.execute("UPDATE baseline SET seal_version = 1, policy = NULL, root = ?",
                     (old_root,))
        conn.execute("DELETE FROM ledger")  # as 0008's migration found it: then re-entered
    from integrity.store.ledger import journal
    store = Store(f"sqlite:///{run.db}")
    try:
        with store.writer() as conn, conn.begin():
            journal(conn, "baseline", [info.id])
    finally:
        store.close()
    assert run("verify").exit_code == 0
    assert "version 1 seal" in run("status").stdout
    _tamper(run.db, tree / "a.conf")
    assert run("verify").exit_code == 2  # a version 1 root still catches an edit
    _tamper(run.db, tree / "a.conf", back=True)
    assert run("approve", "--policy").exit_code == 0
    status = json.loads(run("status", "--json").stdout)
    assert status["baseline"]["seal"]["version"] == 3 and status["baseline"]["root"] != old_root
    assert run("verify").exit_code == 0
