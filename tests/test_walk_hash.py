"""Walker order and boundaries, and safe hashing, on real files."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from integrity.scan.hasher import FileChanged, blake3_fd, digest_path, open_at
from integrity.paths import display, from_key, key_range, to_key
from integrity.policy import parse
from integrity.scan.walker import SkippedTree, WalkEntry, walk


def entries(policy_rules: list[dict[str, object]]) -> list[bytes]:
    return [e.path for e in walk(parse({"rule": policy_rules}))
            if isinstance(e, WalkEntry)]


def test_walk_order_is_key_order(tmp_path: Path) -> None:
    for name in ("b", "b-c", "b.d", "a", "é", "z"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("1")
        (tmp_path / name / "x-y").write_text("1")
    (tmp_path / os.fsdecode(b"\xff\xfe")).write_text("raw")
    paths = entries([{"path": str(tmp_path)}])
    assert paths == sorted(paths, key=to_key)
    assert len(paths) == 1 + 6 * 3 + 1
    assert all(from_key(to_key(p)) == p for p in paths)


def test_key_range_holds_subtree_only() -> None:
    low, high = key_range(b"/etc/ssh")
    inside = [b"/etc/ssh", b"/etc/ssh/a", b"/etc/ssh/z/y"]
    outside = [b"/etc/sshd", b"/etc/ssh-x", b"/etc/ss", b"/etc/ssi"]
    assert all(low <= to_key(p) < high for p in inside)
    assert not any(low <= to_key(p) < high for p in outside)


def test_symlinks_recorded_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "dirlink")
    paths = entries([{"path": str(root)}])
    assert os.fsencode(root / "dirlink") in paths
    assert not any(b"secret" in p for p in paths)


def test_excluded_directories_are_not_descended(tmp_path: Path) -> None:
    (tmp_path / "cache" / "deep").mkdir(parents=True)
    (tmp_path / "keep").write_text("k")
    (tmp_path / "x.swp").write_text("k")
    paths = entries([{"path": str(tmp_path), "exclude": [f"{tmp_path}/cache", "*.swp"]}])
    assert paths == [os.fsencode(tmp_path), os.fsencode(tmp_path / "keep")]


def test_nested_rule_under_excluded_directory_is_still_walked(tmp_path: Path) -> None:
    (tmp_path / "var" / "www").mkdir(parents=True)
    (tmp_path / "var" / "www" / "index.html").write_text("<p>")
    (tmp_path / "var" / "junk").write_text("j")
    paths = entries([{"path": str(tmp_path), "exclude": [f"{tmp_path}/var"]},
                     {"path": str(tmp_path / "var" / "www")}])
    assert os.fsencode(tmp_path / "var" / "www" / "index.html") in paths
    assert os.fsencode(tmp_path / "var" / "junk") not in paths
    assert os.fsencode(tmp_path / "var") not in paths


def test_non_recursive_rule(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "f").write_text("f")
    paths = entries([{"path": str(tmp_path), "recursive": False}])
    assert paths == [os.fsencode(tmp_path), os.fsencode(tmp_path / "d")]


@pytest.fixture
def mounted_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.fail("cannot mount tmpfs: the suite runs as root")
    try:
        (mnt / "inner").write_text("i")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_one_filesystem_stops_at_mount_points(tmp_path: Path, mounted_tmpfs: Path) -> None:
    inner = os.fsencode(mounted_tmpfs / "inner")
    assert inner not in entries([{"path": str(tmp_path)}])
    assert os.fsencode(mounted_tmpfs) in entries([{"path": str(tmp_path)}])
    assert inner in entries([{"path": str(tmp_path), "one_filesystem": False}])


def test_special_files_recorded_and_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    os.mknod(tmp_path / "null", 0o600 | 0o020000, os.makedev(1, 3))
    found = {os.path.basename(e.path): e for e in walk(parse({"rule": [
        {"path": str(tmp_path)}]})) if isinstance(e, WalkEntry)}
    sock.close()
    assert {b"fifo", b"sock", b"null"} <= set(found)
    with pytest.raises(OSError):
        digest_path(os.fsencode(tmp_path / "fifo"))  # refused, does not block


def test_unlistable_directory_becomes_skipped_tree(tmp_path: Path) -> None:
    # Root can list anything: make the directory vanish under the walk instead.
    (tmp_path / "gone").mkdir()
    policy = parse({"rule": [{"path": str(tmp_path)}]})
    items = []
    for item in walk(policy):
        items.append(item)
        if isinstance(item, WalkEntry) and item.path.endswith(b"/gone"):
            os.rmdir(tmp_path / "gone")
    skipped = [i for i in items if isinstance(i, SkippedTree)]
    assert [display(s.path) for s in skipped] == [str(tmp_path / "gone")]
    assert "subtree skipped" in skipped[0].error


def test_digest_matches_b3sum(tree: Path) -> None:
    for name in ("a.conf", "b.bin", "big.dat"):
        path = tree / name
        expected = subprocess.run(["b3sum", "--no-names", str(path)], check=True,
                                  capture_output=True, text=True).stdout.strip()
        assert digest_path(os.fsencode(path))["blake3"].hex() == expected


def test_file_changed_while_read_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "grows"
    path.write_bytes(b"x" * 5000)
    before = os.lstat(path)
    with open(path, "ab") as f:
        f.write(b"more")
    fd = open_at(os.fsencode(path))
    try:
        with pytest.raises(FileChanged):
            blake3_fd(fd, before)
    finally:
        os.close(fd)
    big = tmp_path / "big"
    big.write_bytes(b"y" * (3 << 20))
    before = os.lstat(big)
    os.truncate(big, 2 << 20)
    fd = open_at(os.fsencode(big))
    try:
        with pytest.raises(FileChanged):
            blake3_fd(fd, before)
    finally:
        os.close(fd)


def test_replaced_file_is_detected_by_identity(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("one")
    before = os.lstat(path)
    os.unlink(path)
    path.write_text("two")  # same size, new inode
    fd = open_at(os.fsencode(path))
    try:
        with pytest.raises(FileChanged):
            blake3_fd(fd, before)
    finally:
        os.close(fd)
