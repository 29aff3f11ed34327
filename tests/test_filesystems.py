"""Filesystems other than ext4 under a rule: what the kernel answers there must not
cost a file its content check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from conftest import Cli

#: A read-only FUSE filesystem of one file, /conf, that supports no extended
#: attributes (listxattr answers ENOSYS, as sshfs and many FUSE servers do; the
#: kernel turns it into EOPNOTSUPP). SIGUSR1 changes the file's bytes, not its size
#: or times: only its content tells. SIGUSR2 makes reads fail with EIO, or work again;
#: SIGHUP the same for listing the directory.
SERVER = r"""
import errno, signal, stat, sys, time
from fuse import FUSE, FuseOSError, Operations

content = {"bytes": b"AllowUsers alice\n"}
then = time.time() - 600

class NoXattrs(Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2,
                    "st_mtime": then, "st_ctime": then, "st_atime": then}
        if path != "/conf":
            raise FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1,
                "st_size": len(content["bytes"]), "st_mtime": then, "st_ctime": then,
                "st_atime": then}

    def readdir(self, path, fh):
        if hiding:
            raise FuseOSError(errno.EIO)
        return [".", "..", "conf"]

    def read(self, path, size, offset, fh):
        if failing:
            raise FuseOSError(errno.EIO)
        return content["bytes"][offset:offset + size]

    def listxattr(self, path):
        raise FuseOSError(errno.ENOSYS)

    def getxattr(self, path, name, position=0):
        raise FuseOSError(errno.ENOSYS)

def swap(*_):
    content["bytes"] = b"AllowUsers mallo\n"

def toggle(*_):
    global failing
    failing = not failing

def hide(*_):
    global hiding
    hiding = not hiding

failing = hiding = False
signal.signal(signal.SIGUSR1, swap)
signal.signal(signal.SIGUSR2, toggle)
signal.signal(signal.SIGHUP, hide)
FUSE(NoXattrs(), sys.argv[1], foreground=True, ro=True, direct_io=True, nothreads=True)
"""


class Fuse(NamedTuple):
    """SERVER's mount point; change its file's bytes; make its reads fail (or not)."""

    mnt: Path
    swap: Callable[[], None]
    toggle: Callable[[], None]
    hide: Callable[[], None]


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[Fuse]:
    """SERVER, mounted."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("needs root and /dev/fuse (scripts/test runs as root)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(mnt)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (mnt / "conf").exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the FUSE server did not mount"
            time.sleep(0.05)
        with pytest.raises(OSError) as unsupported:
            os.listxattr(mnt / "conf")
        assert unsupported.value.errno == 95  # EOPNOTSUPP, as the scan meets it

        def swap() -> None:
            server.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while (mnt / "conf").read_bytes() != b"AllowUsers mallo\n":
                assert time.monotonic() < deadline, "the FUSE server did not swap"
                time.sleep(0.02)

        def toggle() -> None:
            server.send_signal(signal.SIGUSR2)
            time.sleep(0.2)  # direct_io: the next read asks the server

        def hide() -> None:
            server.send_signal(signal.SIGHUP)
            time.sleep(0.2)

        yield Fuse(mnt, swap, toggle, hide)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        server.wait(timeout=10)


def test_a_filesystem_without_extended_attributes_keeps_its_content_checked(
        fuse_mount: Fuse, write_policy: Callable[..., Path], tmp_path: Path) -> None:
    """listxattr failing with EOPNOTSUPP used to fail the whole read: init stored the
    file without a digest, with a warning, and no content change was ever reported."""
    mnt, swap = fuse_mount.mnt, fuse_mount.swap
    policy = write_policy({"path": str(mnt), "check": "config", "severity": "critical"})
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    init = cli("init")
    assert init.exit_code == 0, init.stderr
    assert "warning" not in init.stderr.lower(), init.stderr
    swap()
    report = json.loads(cli("verify", "--json").stdout)
    assert report["errors"] == []
    assert [(c["path"], c["changed"]) for c in report["changes"]] == [
        (str(mnt / "conf"), ["content"])]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_an_entry_that_cannot_be_read_is_alerted_until_it_can(
        fuse_mount: Fuse, write_policy: Callable[..., Path], tmp_path: Path,
        what: str) -> None:
    """A file that cannot be read cannot be compared: its change would go unseen.
    Whatever makes the read fail (an I/O error here; a fanotify permission event
    denying our opens, for root), it is an open warning alerted once at its rule's
    severity, and its resolution alerted when it can be read again."""
    alerts = tmp_path / "alerts.jsonl"
    policy = write_policy({"path": str(fuse_mount.mnt), "check": "config",
                           "severity": "critical"},
                          extra=f'[[alert]]\ntype = "jsonl"\npath = "{alerts}"\n')
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    # A file that cannot be read; a directory that cannot be listed hides its tree.
    conf = str(fuse_mount.mnt / "conf") if what == "file" else str(fuse_mount.mnt)
    toggle = fuse_mount.toggle if what == "file" else fuse_mount.hide

    def warnings() -> list[dict[str, Any]]:
        return [e for e in cli.json("events")
                if e["kind"] == "warning" and e["path"] == conf]

    def alerted() -> list[dict[str, Any]]:
        lines = alerts.read_text().splitlines() if alerts.exists() else []
        return [a for a in map(json.loads, lines) if a["path"] == conf]

    toggle()
    for _ in range(2):
        result = cli("verify", "--json")
        assert result.exit_code == 1
        assert [e["path"] for e in json.loads(result.stdout)["errors"]] == [conf]
    [warning] = warnings()
    assert (warning["status"], warning["severity"], warning["classification"],
            warning["count"]) == ("open", "critical", "unreadable", 2)
    assert "Input/output error" in warning["new"]["warning"]
    assert len(alerted()) == 1  # once, not at every scan

    toggle()
    assert cli("verify").exit_code == 0
    [warning] = warnings()
    assert warning["status"] == "resolved"
    assert len(alerted()) == 2  # and its resolution


@pytest.fixture
def bind_mounts() -> Iterator[Callable[[Path, Path], None]]:
    """mount --bind, undone after the test."""
    mounted: list[Path] = []

    def bind(source: Path, target: Path) -> None:
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        mounted.append(target)

    yield bind
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.parametrize("rule_on_the_file", [False, True])
def test_a_filesystem_mounted_over_a_protected_file_is_alerted(
        bind_mounts: Callable[[Path, Path], None], write_policy: Callable[..., Path],
        tmp_path: Path, rule_on_the_file: bool) -> None:
    """The attack: bind-mount a file (or a FUSE file that serves the original bytes
    to us and others to everyone else) over sshd_config. No inotify event, and the
    scan reads what the mount shows. The walk sees the file on another device than
    its directory, confirms the mount point in /proc/self/mountinfo, and reports it
    at every scan, --fast included, until it is gone."""
    tree = tmp_path / "ssh"
    tree.mkdir()
    conf = tree / "sshd_config"
    conf.write_text("AllowUsers alice\n")
    decoy = tmp_path / "elsewhere" / "decoy"  # another filesystem would do as well
    decoy.parent.mkdir()
    decoy.write_text("AllowUsers alice\n")  # even the same bytes
    alerts = tmp_path / "alerts.jsonl"
    policy = write_policy({"path": str(conf if rule_on_the_file else tree),
                           "check": "config", "severity": "critical"},
                          extra=f'[[alert]]\ntype = "jsonl"\npath = "{alerts}"\n')
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    bind_mounts(decoy, conf)
    assert os.stat(conf).st_dev == os.stat(tree).st_dev  # the same filesystem: a bind
    for args in (("verify",), ("verify", "--fast")):
        result = cli(*args, "--json")
        assert result.exit_code == 1, args
        assert json.loads(result.stdout)["errors"] == [{
            "path": str(conf), "error": "mount check failed: a filesystem is mounted on "
                                        "it (checked as the mount shows it)"}], args
    alerted = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert [(a["path"], a["kind"], a["severity"]) for a in alerted] == [
        (str(conf), "warning", "critical")]
    subprocess.run(["umount", str(conf)], check=True)
    assert cli("verify").exit_code == 0
