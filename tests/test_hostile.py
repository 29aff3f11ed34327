"""Hostile trees: what an intruder (or an unlucky moment) can put in a protected tree.

Real files and real processes throughout: trees nested deeper than PATH_MAX, a
4,000-byte path, a 2 GB sparse file hashed by a real `init` process whose peak memory
the kernel reports, writers and flippers running in processes of their own while
`init` and `verify` read the tree. The database is read from the outside with
sqlite3 (and as raw bytes) the way an auditor would. Where a race decides whether a
guard is reached, a test beside it sets the moment up for certain and calls the
guard itself.

FIFOs, sockets, devices, non-UTF-8 names and permission errors are test_verify.py's
and test_walk_hash.py's business; this file does not repeat them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import pytest

from conftest import REPO, Cli, ro
from integrity.errors import Vanished
from integrity.scan.hasher import FileChanged, blake3_fd, open_at, recent_since
from integrity.paths import to_key
from integrity.scan.records import _rehash_by_path
from integrity.policy import parse
from integrity.ops.baseline import build_baseline
from integrity.scan import Outcome
from integrity.scan.scanner import collect
from integrity.store import Store
from integrity.scan.walker import WalkEntry, open_parent, walk

MB = 1 << 20
#: SPEC's warning shape: "operation failed: cause (consequence)".
ERROR_SHAPE = re.compile(r"^[a-z][a-z ]* failed: .+ \(.+\)$")
#: What `init` prints for a per-file problem on stderr.
WARNING_LINE = re.compile(r"^warning: [a-z][a-z ]* failed for '.+': .+ \(.+\)$")

Policy = Callable[..., Path]


# -- helpers --------------------------------------------------------------------------

def entry(db: Path, path: bytes) -> dict[str, Any] | None:
    """The active baseline's row for path, as a dict (None if not recorded)."""
    conn = ro(db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT e.* FROM entry e JOIN baseline b ON b.id = e.baseline_id "
            "WHERE b.state = 'active' AND e.key = ?", (to_key(path),)).fetchone()
    finally:
        conn.close()
    return dict(row) if row else None


def database_bytes(db: Path) -> bytes:
    """Everything SQLite keeps on disk for this database: the file, its WAL and shm."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = Path(f"{db}{suffix}")
        if part.exists():
            data += part.read_bytes()
    return data


def all_blobs(db: Path) -> list[bytes]:
    """Every non-NULL blob or text value of every row of table entry."""
    conn = ro(db)
    try:
        found: list[bytes] = []
        for row in conn.execute("SELECT * FROM entry"):
            for value in row:
                if isinstance(value, bytes):
                    found.append(value)
                elif isinstance(value, str):
                    found.append(value.encode())
        return found
    finally:
        conn.close()


def open_dirs(root: Path, names: list[str], create: bool = False) -> int:
    """An fd of root/names[0]/.../names[-1], reached one component at a time (so
    paths longer than PATH_MAX work); creates the directories if asked."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        if create:
            os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def write_at(dir_fd: int, name: str, data: bytes, flags: int = os.O_CREAT) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_TRUNC | flags, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@contextmanager
def background(script: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run a Python snippet in a process of its own for the duration of the block.

    The process is ours: it is killed by its pid and reaped, whatever happens.
    """
    proc = subprocess.Popen([sys.executable, "-c", script, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        # Each snippet says "ready" once its first round is done.
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == b"ready", proc.stderr.read()  # type: ignore[union-attr]
        yield proc
        assert proc.poll() is None, (
            f"background process died: {proc.stderr.read()!r}")  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def policy_for(write_policy: Policy, root: Path, check: str = "static",
               name: str = "policy.toml") -> Path:
    return write_policy({"path": str(root), "check": check, "severity": "high"}, name=name)


def cli(tmp_path: Path, policy: Path, name: str = "integrity.db") -> Cli:
    return Cli(tmp_path / "state" / name, policy)


def verify_doc(run: Cli, *args: str, traceback: bool = False) -> tuple[int, dict[str, Any]]:
    """verify --json: exit status 0 or 1, never a traceback; (status, document).
    With `traceback`, -vv puts the traceback of an internal error into the failure."""
    result = run(*(["-vv"] if traceback else []), "verify", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.stderr
    return result.exit_code, json.loads(result.stdout)


# -- 300-deep nesting, beyond PATH_MAX ---------------------------------------------------

DEPTH = 300
#: 17-byte names: 300 of them make paths of over 5,000 bytes, past PATH_MAX (4096).
DEEP_NAMES = [f"level-{i:03d}-abcdef" for i in range(DEPTH)]


@pytest.fixture
def deep(tmp_path: Path, write_policy: Policy) -> tuple[Cli, Path, bytes]:
    """A tree 300 directories deep whose deepest paths are longer than PATH_MAX,
    with a file at depth 300; its baseline is built. Returns (cli, root, deepest dir)."""
    root = tmp_path / "deep"
    root.mkdir()
    fd = open_dirs(root, DEEP_NAMES, create=True)
    try:
        write_at(fd, "deep.txt", b"at the bottom\n")
        os.setxattr(fd, "user.label", b"one")
    finally:
        os.close(fd)
    deepest = os.fsencode(root) + b"/" + "/".join(DEEP_NAMES).encode()
    assert len(deepest) > 4096
    run = cli(tmp_path, policy_for(write_policy, root))
    result = run("init")
    assert result.exit_code == 0, result.output
    assert result.stderr == "", result.stderr
    return run, root, deepest


def test_300_deep_nesting_beyond_path_max_is_recorded_and_verified(
        deep: tuple[Cli, Path, bytes]) -> None:
    run, root, deepest = deep
    deep_file = deepest + b"/deep.txt"
    # Every level and the file at the bottom are in the baseline.
    recorded = entry(run.db, deep_file)
    assert recorded is not None and recorded["type"] == "file"
    assert recorded["content"] == blake3.blake3(b"at the bottom\n").digest()
    assert entry(run.db, deepest)["type"] == "dir"  # type: ignore[index]
    conn = ro(run.db)
    try:
        assert conn.execute("SELECT entries FROM baseline WHERE state = 'active'"
                            ).fetchone()[0] == 1 + DEPTH + 1
    finally:
        conn.close()

    code, doc = verify_doc(run)
    assert code == 0, doc
    assert doc["summary"]["scanned"] == 1 + DEPTH + 1

    # A change and an addition at depth 300 are reported under their full paths.
    fd = open_dirs(root, DEEP_NAMES)
    try:
        write_at(fd, "deep.txt", b"changed at the bottom\n", flags=0)
        write_at(fd, "planted", b"new\n")
    finally:
        os.close(fd)
    code, doc = verify_doc(run)
    assert code == 1
    changes = {c["path"]: c for c in doc["changes"]}
    assert changes[os.fsdecode(deep_file)]["kind"] == "modified"
    assert {"content", "size"} <= set(changes[os.fsdecode(deep_file)]["changed"])
    assert changes[os.fsdecode(deepest + b"/planted")]["kind"] == "added"
    assert set(changes) == {os.fsdecode(p) for p in (deep_file, deepest + b"/planted",
                                                    deepest)}
    assert doc["errors"] == []


def test_xattr_change_on_a_directory_beyond_path_max_is_reported(
        deep: tuple[Cli, Path, bytes]) -> None:
    """Extended attributes (ACLs, SELinux labels) of a directory 300 levels down are
    part of its record like anywhere else: a relabel there must not go unseen."""
    run, root, deepest = deep
    recorded = entry(run.db, deepest)
    assert recorded is not None
    assert recorded["xattrs"] is not None, (
        "the deepest directory carries user.label, but its xattrs were not recorded")
    fd = open_dirs(root, DEEP_NAMES)
    try:
        os.setxattr(fd, "user.label", b"two")
    finally:
        os.close(fd)
    code, doc = verify_doc(run)
    assert code == 1
    changes = {c["path"]: c["changed"] for c in doc["changes"]}
    assert "xattrs" in changes.get(os.fsdecode(deepest), []), doc["changes"]


def test_a_change_beyond_path_max_can_be_approved(deep: tuple[Cli, Path, bytes]) -> None:
    """verify reports changes 300 levels down; approve --all must be able to accept
    them, or the operator can never close them short of a new init."""
    run, root, deepest = deep
    fd = open_dirs(root, DEEP_NAMES)
    try:
        write_at(fd, "deep.txt", b"a legitimate edit\n", flags=0)
    finally:
        os.close(fd)
    code, _ = verify_doc(run)
    assert code == 1
    result = run("approve", "--all", "--reason", "deep edit", "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["left_open"] == [], outcome
    code, doc = verify_doc(run)
    assert code == 0, doc


# -- a 4,000-byte path ---------------------------------------------------------------

def test_a_4000_byte_path_is_recorded_verified_and_approved(
        tmp_path: Path, write_policy: Policy) -> None:
    root = tmp_path / "long"
    root.mkdir()
    remaining = 4000 - len(os.fsencode(root)) - 1
    count = remaining // 201 if remaining % 201 else remaining // 201 - 1
    names = [f"{i:02d}" + "p" * 198 for i in range(count)]
    leaf = "f" * (remaining - 201 * count)
    assert all(len(n) == 200 for n in names) and 1 <= len(leaf) <= 255
    fd = open_dirs(root, names, create=True)
    try:
        write_at(fd, leaf, b"long way down\n")
    finally:
        os.close(fd)
    path = os.fsencode(root) + b"/" + "/".join([*names, leaf]).encode()
    assert len(path) == 4000

    run = cli(tmp_path, policy_for(write_policy, root))
    result = run("init")
    assert result.exit_code == 0 and result.stderr == "", result.output
    recorded = entry(run.db, path)
    assert recorded is not None and len(recorded["key"]) == 4000
    assert recorded["content"] == blake3.blake3(b"long way down\n").digest()
    assert verify_doc(run)[0] == 0

    Path(os.fsdecode(path)).write_bytes(b"changed on the long way down\n")
    code, doc = verify_doc(run)
    assert code == 1
    assert [(c["path"], c["kind"]) for c in doc["changes"]] == [
        (os.fsdecode(path), "modified")]
    result = run("approve", os.fsdecode(path), "--reason", "long path")
    assert result.exit_code == 0, result.output
    assert verify_doc(run)[0] == 0
    assert entry(run.db, path)["content"] == blake3.blake3(  # type: ignore[index]
        b"changed on the long way down\n").digest()


# -- a 2 GB sparse file ---------------------------------------------------------------

SPARSE_SIZE = 2 << 30
MAXRSS_LIMIT_KB = 150 * 1024


def _sparse_dir(tmp_path: Path) -> Path:
    """tmp_path if its filesystem keeps holes, else /var/tmp."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as handle:
        handle.truncate(64 * MB)
    holes = os.stat(probe).st_blocks * 512 < MB
    probe.unlink()
    if holes:
        return tmp_path
    return Path("/var/tmp")


def test_2gb_sparse_file_is_hashed_with_bounded_memory(tmp_path: Path,
                                                       write_policy: Policy) -> None:
    base = _sparse_dir(tmp_path)
    root = base / f"sparse-{os.getpid()}"
    root.mkdir(exist_ok=base != tmp_path)
    big = root / "disk.img"
    try:
        with open(big, "wb") as handle:
            handle.truncate(SPARSE_SIZE)
            for offset in (0, SPARSE_SIZE // 2 + 12345, SPARSE_SIZE - 7):
                handle.seek(offset)
                handle.write(b"data!")
        assert os.stat(big).st_size == SPARSE_SIZE
        assert os.stat(big).st_blocks * 512 < 16 * MB, "the file is not sparse"
        policy = policy_for(write_policy, root)
        db = tmp_path / "state" / "sparse.db"
        log = tmp_path / "init.log"
        # The kernel's account of the process, its workers included (they are reaped
        # by it before it exits): the peak resident set, in KiB. It is taken by a
        # small launcher: a direct child of pytest inherits pytest's own peak through
        # vfork and exec, which would measure the test runner, not init.
        launcher = ("import os, subprocess, sys\n"
                    "proc = subprocess.Popen(sys.argv[1:])\n"
                    "_, status, usage = os.wait4(proc.pid, 0)\n"
                    "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, "
                    "file=sys.stderr)\n")
        with open(log, "wb") as out:
            launched = subprocess.run(
                [sys.executable, "-c", launcher, sys.executable, "-m", "integrity",
                 "--db", f"sqlite:///{db}", "--policy", str(policy), "-q", "init"],
                stdout=out, stderr=subprocess.PIPE, cwd=REPO, check=True)
        code, maxrss = map(int, launched.stderr.split()[-2:])
        assert code == 0, log.read_text()
        print(f"init of a 2 GB sparse file: peak RSS {maxrss / 1024:.0f} MiB")
        assert maxrss < MAXRSS_LIMIT_KB, f"init used {maxrss / 1024:.0f} MiB for a 2 GB file"
        expected = subprocess.run(["b3sum", "--no-names", str(big)], check=True,
                                  capture_output=True, text=True).stdout.strip()
        recorded = entry(db, os.fsencode(big))
        assert recorded is not None and recorded["size"] == SPARSE_SIZE
        assert recorded["content"].hex() == expected
    finally:
        if big.exists():
            big.unlink()
        if base != tmp_path:
            root.rmdir()


# -- a file that grows, shrinks or is replaced while init hashes it ---------------------

#: Content streams the writer builds its versions from (BLAKE3's XOF: no two alike).
STREAMS = {"A": 64 * MB, "B": 64 * MB, "S": 88 * MB}


def stream(name: str) -> bytes:
    return blake3.blake3(name.encode()).digest(length=STREAMS[name])


def states(how: str) -> set[bytes]:
    """Digests of every state the writer ever leaves the file in between two of its
    system calls: a consistent read can only ever see one of these."""
    digests = {blake3.blake3(stream(n), max_threads=blake3.blake3.AUTO).digest()
               for n in ("A", "B", "S")}
    if how == "grow-shrink":
        data = stream("S")
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        digests = {hasher.digest()}
        for offset in range(0, len(data), MB):
            hasher.update(data[offset:offset + MB])
            digests.add(hasher.digest())
    return digests


WRITER = r"""
import mmap, os, random, sys, time, blake3
target, staging, how = sys.argv[1], sys.argv[2], sys.argv[3]
SIZES = {"A": 64 << 20, "B": 64 << 20, "S": 88 << 20}
data = {n: blake3.blake3(n.encode()).digest(length=s) for n, s in SIZES.items()}
MB = 1 << 20
rng = random.Random(7)
# Versions A and B also as files on disk, written out and dropped from the page cache
# before each use: a write() from their mapping pulls the pages in as it copies, as a
# program writing from an mmap-ed file does, so one write() takes tens of ms.
sources = []
for name in "AB":
    path = os.path.join(staging, "source-" + name)
    with open(path, "wb") as f:
        f.write(data[name])
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    sources.append((fd, mmap.mmap(fd, 0, prot=mmap.PROT_READ)))
fd = os.open(target, os.O_WRONLY)
print("ready", flush=True)
n = 0
while True:
    n += 1
    if how == "overwrite":        # one write() over the same number of bytes: A <-> B
        source, mapped = sources[n % 2]
        os.posix_fadvise(source, 0, 0, os.POSIX_FADV_DONTNEED)
        mapped.madvise(mmap.MADV_DONTNEED)
        os.pwrite(fd, mapped, 0)
    elif how == "grow-shrink":    # emptied, grows 1 MB a write to all of S, cut to 40 MB
        os.ftruncate(fd, 0)
        for off in range(0, len(data["S"]), MB):
            os.pwrite(fd, data["S"][off:off + MB], off)
        time.sleep(rng.random() * 0.05)
        os.ftruncate(fd, 40 * MB)
    elif how == "replace":        # written elsewhere, renamed over it: A, B, S in turn
        tmp = os.path.join(staging, "next-%d" % n)
        with open(tmp, "wb") as f:
            f.write(data["ABS"[n % 3]])
        os.rename(tmp, target)
    time.sleep(rng.random() * 0.1)
"""


@pytest.mark.parametrize("how", ["overwrite", "grow-shrink", "replace"])
def test_file_changing_while_init_hashes_it_is_never_torn(
        tmp_path: Path, write_policy: Policy, how: str) -> None:
    """The recorded digest is that of a state the writer really left the file in, or
    there is none and a 'kept changing' warning: never a mix of two versions."""
    root = tmp_path / "busy"
    root.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    target = root / "hot.bin"
    target.write_bytes(stream("S" if how == "grow-shrink" else "A"))
    (root / "calm.txt").write_text("calm\n")
    complete = states(how)
    run = cli(tmp_path, policy_for(write_policy, root))
    outcomes = []
    with background(WRITER, str(target), str(staging), how):
        for attempt in range(10):
            result = run("init", "--force")
            assert result.exit_code == 0, result.output
            for line in result.stderr.splitlines():
                assert WARNING_LINE.match(line), line
            recorded = entry(run.db, os.fsencode(target))
            assert recorded is not None, "the file was not recorded at all"
            digest = recorded["content"]
            if digest is None:
                assert any(f"'{target}'" in line and "kept changing" in line
                           for line in result.stderr.splitlines()), result.stderr
                outcomes.append("kept changing")
            else:
                assert digest in complete, (
                    f"attempt {attempt}: recorded digest {digest.hex()} "
                    f"(size {recorded['size']}) is not that of any state the writer "
                    "left the file in: a torn read")
                outcomes.append(f"{recorded['size'] // MB} MB")
            calm = entry(run.db, os.fsencode(root / "calm.txt"))
            assert calm is not None and calm["content"] == blake3.blake3(b"calm\n").digest()
    print(f"{how}: {outcomes}")


def test_a_recently_changed_file_is_read_twice_and_the_reads_must_agree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard the writer above exercises by chance: a file changed lately may be
    inside a write whose stamps were set before we looked, so its stat proves
    nothing; a second read that differs from the first throws the digest away."""
    path = tmp_path / "fresh"
    path.write_bytes(b"first version\n" * 100)
    st = os.lstat(path)
    reads: list[bytes] = []
    real_pread = os.pread

    def second_read_differs(fd: int, size: int, offset: int) -> bytes:
        data = real_pread(fd, size, offset)
        reads.append(data)
        return data if len(reads) == 1 else data[::-1]

    monkeypatch.setattr(os, "pread", second_read_differs)
    fd = open_at(os.fsencode(path))
    try:
        with pytest.raises(FileChanged):
            blake3_fd(fd, st)
        assert len(reads) == 2
        # A file older than the scan's `recent` mark is read once, with read().
        reads.clear()
        os.lseek(fd, 0, os.SEEK_SET)
        digest = blake3_fd(fd, st, recent=st.st_ctime_ns + 1)
    finally:
        os.close(fd)
    assert reads == [] and digest == blake3.blake3(path.read_bytes()).digest()


VANISHER = r"""
import os, sys
from inotify_simple import INotify, flags
root = sys.argv[1]
tmp, final = os.path.join(root, "upgrade.tmp"), os.path.join(root, "program")
inotify = INotify()
inotify.add_watch(root, flags.OPEN)
block = os.urandom(64 << 20)
first = True
while True:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, block)
    inotify.read(timeout=0)                  # forget our own opens
    if first:
        print("ready", flush=True)
        first = False
    opened = 0
    while opened < 3:
        # Each time the scanner opens the temporary file, it is still being written
        # (so the read is thrown away and retried); the third time, it is renamed
        # into place (gone under its old name) while the scanner is still reading.
        for event in inotify.read():
            if event.name == "upgrade.tmp":
                opened += 1
                os.pwrite(fd, os.urandom(4096), 0)
    os.rename(tmp, final)
    os.close(fd)
"""


def test_a_file_that_vanishes_after_changing_while_hashed_never_aborts_the_scan(
        tmp_path: Path) -> None:
    """The pattern of every package manager and editor: a temporary file is written,
    then renamed into place. Hashing the temporary file while it is still being
    written, then finding it gone, is a warning about that file, not a failed scan.

    The writer reacts to the scanner's opens (inotify IN_OPEN) to land the rename
    inside the scanner's last attempt at reading the file."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "program").write_bytes(b"v0")
    policy = parse({"rule": [{"path": str(root), "check": "static"}]}, "hostile.toml")
    store = Store(f"sqlite:///{tmp_path}/vanish.db")
    failures: list[str] = []
    builds = 0
    try:
        with background(VANISHER, str(root)):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and builds < 12:
                builds += 1
                try:
                    result = build_baseline(lambda: store, policy, force=True, parallel=0)
                except OSError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                for warning in result.warnings:
                    assert ERROR_SHAPE.match(warning.error), warning
    finally:
        store.close()
    assert not failures, (f"{len(failures)} of {builds} baselines failed with an "
                          f"exception, first: {failures[0]}")


# -- TOCTOU: a symlink swapped for a file between lstat and open ------------------------

FLIPPER = r"""
import os, sys
path, secret, staging = sys.argv[1], sys.argv[2], sys.argv[3]
data = b"an ordinary regular file\n" * 400
n = 0
while True:
    n += 1
    link = os.path.join(staging, "l%d" % n)
    os.symlink(secret, link)
    os.rename(link, path)               # now a symlink to the secret
    plain = os.path.join(staging, "f%d" % n)
    with open(plain, "wb") as f:
        f.write(data)
    os.rename(plain, path)              # now a regular file
    if n == 1:
        print("ready", flush=True)
"""


@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A root-only file outside every protected tree (think /etc/shadow)."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    path = outside / "shadow"
    path.write_bytes(b"".join(b"user%d:$6$salt$%s:19000::\n" % (i, os.urandom(32).hex().encode())
                              for i in range(50)))
    path.chmod(0o600)
    return path, blake3.blake3(path.read_bytes()).digest()


def assert_secret_absent(db: Path, digest: bytes) -> None:
    data = database_bytes(db)
    assert digest not in data, "the secret's digest is stored in the database"
    assert digest.hex().encode() not in data, "the secret's digest (hex) is stored"


def test_symlink_flipped_with_a_file_never_records_the_secret(
        tmp_path: Path, write_policy: Policy, secret: tuple[Path, bytes]) -> None:
    secret_path, secret_digest = secret
    root = tmp_path / "etc"
    root.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    flip = root / "passwd"
    regular = b"an ordinary regular file\n" * 400
    flip.write_bytes(regular)
    (root / "hosts").write_text("127.0.0.1 localhost\n")
    regular_digest = blake3.blake3(regular).digest()
    run = cli(tmp_path, policy_for(write_policy, root, check="config"))
    assert run("init").exit_code == 0
    seen: dict[str, int] = {}

    def check_entry(result: Any, must_explain: bool) -> None:
        recorded = entry(run.db, os.fsencode(flip))
        # A warning naming it (init), or approve's word that it stays as it was.
        explained = (f"'{flip}'" in result.stderr
                     or f"left open unreadable {flip}:" in result.stdout)
        if recorded is None:
            # Left out of a new baseline, or not approved: only with a word that says so.
            assert not must_explain or explained, result.output
            seen["not recorded"] = seen.get("not recorded", 0) + 1
            return
        assert recorded["content"] in (None, regular_digest), recorded
        if recorded["type"] == "symlink":
            # Its target, or none with a word that says why (a file again when it was
            # read; an approval that could not read it leaves that entry as it was).
            assert recorded["link"] == os.fsencode(secret_path) or (
                recorded["link"] is None and explained), (recorded, result.output)
        seen[recorded["type"]] = seen.get(recorded["type"], 0) + 1

    with background(FLIPPER, str(flip), str(secret_path), str(staging)):
        for i in range(24):
            if i % 6 in (2, 5):
                was_recorded = entry(run.db, os.fsencode(flip)) is not None
                if i % 6 == 5:
                    result = run("init", "--force")
                else:
                    result = run("approve", str(flip), "--reason", "flip")
                assert result.exit_code == 0, result.output
                # (A new baseline can lose the path silently: that is
                # test_worker_shares_cover_an_entry_that_changes_type's business.)
                check_entry(result, was_recorded and i % 6 == 2)
            else:
                code, doc = verify_doc(run, traceback=True)
                for change in doc["changes"]:
                    for state in (change["old"], change["new"]):
                        if state and state.get("content") is not None:
                            assert state["content"] == regular_digest.hex(), change
    # Events hold old and new states: none of them is the secret.
    conn = ro(run.db)
    try:
        for old, new in conn.execute("SELECT old, new FROM event"):
            for state in (old, new):
                content = json.loads(state or "null") or {}
                assert content.get("content") in (None, regular_digest.hex()), state
    finally:
        conn.close()
    assert_secret_absent(run.db, secret_digest)
    print(f"recorded types of the flipped path: {seen}")


def test_worker_shares_cover_an_entry_that_changes_type(tmp_path: Path) -> None:
    """init and verify split the walk between workers that each list the directories
    themselves; an entry that is a regular file for one worker's listing and a
    symlink for the other's must still be in the union of their shares (the walker's
    contract: the shares together are exactly the whole walk)."""
    root = tmp_path / "etc"
    root.mkdir()
    # A name that the file share gives to worker 1 (the non-file share is worker 0's).
    name = next(f"flip{i}" for i in range(100) if hash(f"flip{i}") % 2 == 1)
    flip = root / name
    flip.write_text("a regular file\n")
    policy = parse({"rule": [{"path": str(root), "check": "static"}]}, "hostile.toml")
    share0 = [e.path for e in walk(policy, share=(0, 2)) if isinstance(e, WalkEntry)]
    flip.unlink()
    os.symlink("/etc/shadow", flip)  # between the two workers' listings
    share1 = [e.path for e in walk(policy, share=(1, 2)) if isinstance(e, WalkEntry)]
    assert os.fsencode(flip) in share0 + share1, (
        f"{flip} exists throughout, but neither worker's share holds it")


DIR_FLIPPER = r"""
import os, sys, time
tree_sub, staging, outside = sys.argv[1], sys.argv[2], sys.argv[3]
real, link = os.path.join(staging, "sub"), os.path.join(staging, "link")
os.symlink(outside, link)
print("ready", flush=True)
while True:
    os.rename(tree_sub, real)
    os.rename(link, tree_sub)           # the directory is now a symlink out of the tree
    time.sleep(0.0005)
    os.rename(tree_sub, link)
    os.rename(real, tree_sub)           # and the real directory again
    time.sleep(0.002)
"""

BUSY_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)  # through its fd: never by path
print("ready", flush=True)
i = 0
while True:
    i += 1
    os.pwrite(fd, bytes([i % 256]) * 65536, (i * 65536) % (4 << 20))
"""


def test_directory_swapped_for_a_symlink_never_leads_outside_the_tree(
        tmp_path: Path, secret: tuple[Path, bytes]) -> None:
    """A file that changes while it is read is read again; a parent directory swapped
    for a symlink meanwhile must not make that second read land outside the tree."""
    secret_path, secret_digest = secret
    root = tmp_path / "etc"
    sub = root / "sub"
    sub.mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    busy = sub / secret_path.name  # same name as the secret beside the symlink's target
    busy.write_bytes(b"a" * (4 * MB))
    policy = parse({"rule": [{"path": str(root), "check": "static"}]}, "hostile.toml")
    db = tmp_path / "swap.db"
    store = Store(f"sqlite:///{db}")
    builds = failures = 0
    try:
        with background(BUSY_WRITER, str(busy)), \
                background(DIR_FLIPPER, str(sub), str(staging), str(secret_path.parent)):
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                builds += 1
                try:
                    build_baseline(lambda: store, policy, force=True, parallel=0)
                except OSError:
                    failures += 1  # test_a_file_that_vanishes_... covers this failure
                    continue
                recorded = entry(db, os.fsencode(busy))
                if recorded is not None:
                    assert recorded["content"] != secret_digest, (
                        f"build {builds}: {busy} was recorded with the digest of "
                        f"{secret_path}, outside the tree")
                    assert recorded["inode"] != os.stat(secret_path).st_ino
    finally:
        store.close()
    assert_secret_absent(db, secret_digest)
    print(f"{builds} baselines built under the flipper ({failures} failed)")


def test_the_re_read_never_follows_a_parent_swapped_for_a_symlink(
        tmp_path: Path, secret: tuple[Path, bytes]) -> None:
    """The race above, made certain: the walk saw etc/sub/shadow, then sub became a
    symlink to the secret's directory before the re-read of a changed file."""
    secret_path, secret_digest = secret
    root = tmp_path / "etc"
    (root / "sub").mkdir(parents=True)
    busy = root / "sub" / secret_path.name
    busy.write_bytes(b"inside the tree\n")
    policy = parse({"rule": [{"path": str(root), "check": "static"}]}, "hostile.toml")
    seen = next(e for e in walk(policy)
                if isinstance(e, WalkEntry) and e.path == os.fsencode(busy))
    (root / "sub").rename(tmp_path / "moved")
    os.symlink(secret_path.parent, root / "sub")
    with pytest.raises(NotADirectoryError):
        os.close(open_parent(seen.path, os.fsencode(root))[0])
    record, warning = _rehash_by_path(seen, True, recent_since())
    assert record is None
    assert warning is not None and warning.consequence == "vanished during scan", warning
    assert ERROR_SHAPE.match(warning.error), warning


def test_a_changed_file_that_vanishes_before_its_re_read_is_a_warning(
        tmp_path: Path) -> None:
    root = tmp_path / "etc"
    root.mkdir()
    gone = root / "gone"
    gone.write_text("here for the walk only\n")
    policy = parse({"rule": [{"path": str(root), "check": "static"}]}, "hostile.toml")
    seen = next(e for e in walk(policy)
                if isinstance(e, WalkEntry) and e.path == os.fsencode(gone))
    gone.unlink()
    record, warning = _rehash_by_path(seen, True, recent_since())
    assert record is None
    assert warning is not None and warning.consequence == "vanished during scan", warning


def test_a_new_entry_that_vanished_before_it_was_read_is_only_a_warning(
        tmp_path: Path) -> None:
    """Not in the baseline and gone before it could be read: nothing to compare, one
    warning (the churn below meets this by chance; here it is certain)."""
    policy = parse({"rule": [{"path": str(tmp_path), "check": "static"}]}, "hostile.toml")
    path = os.fsencode(tmp_path / "fleeting")
    warning = Vanished(path, "open", "No such file or directory")
    result = collect(iter([Outcome(None, warning, policy.rules[0], None)]), policy)
    assert result.changes == [] and result.warnings == [warning]


# -- a symlink to a secret outside the tree --------------------------------------------

def test_symlink_to_a_secret_is_recorded_as_a_link_and_never_read(
        tmp_path: Path, write_policy: Policy, secret: tuple[Path, bytes]) -> None:
    secret_path, secret_digest = secret
    root = tmp_path / "etc"
    root.mkdir()
    (root / "motd").write_text("welcome\n")
    os.symlink(secret_path, root / "shadow-link")
    os.symlink(secret_path.parent, root / "dir-link")
    atime = os.stat(secret_path).st_atime_ns
    run = cli(tmp_path, policy_for(write_policy, root))
    assert run("init").exit_code == 0
    assert verify_doc(run)[0] == 0

    recorded = entry(run.db, os.fsencode(root / "shadow-link"))
    assert recorded is not None
    assert recorded["type"] == "symlink"
    assert recorded["link"] == os.fsencode(secret_path)
    assert recorded["content"] is None
    assert recorded["size"] == len(os.fsencode(secret_path))  # the link's, not the file's
    dir_link = entry(run.db, os.fsencode(root / "dir-link"))
    assert dir_link is not None and dir_link["type"] == "symlink"
    # Nothing below the linked directory was walked.
    conn = ro(run.db)
    try:
        keys = [k for (k,) in conn.execute("SELECT key FROM entry")]
    finally:
        conn.close()
    assert not any(k.startswith(to_key(os.fsencode(root / "dir-link")) + b"\x00")
                   for k in keys)
    assert secret_digest not in all_blobs(run.db)
    assert not any(secret_digest.hex().encode() in blob for blob in all_blobs(run.db))
    assert_secret_absent(run.db, secret_digest)
    assert os.stat(secret_path).st_atime_ns == atime, "the secret was read"


# -- a directory that vanishes mid-walk ----------------------------------------------

CHURNER = r"""
import os, shutil, sys
root = sys.argv[1]
churn = os.path.join(root, "churn")
n = 0
while True:
    n += 1
    os.mkdir(churn)
    os.mkdir(os.path.join(churn, "nested"))
    for i in range(200):
        where = churn if i % 2 else os.path.join(churn, "nested")
        with open(os.path.join(where, "f%03d" % i), "wb") as f:
            f.write(b"%d %d\n" % (n, i))
    if n == 1:
        print("ready", flush=True)
    shutil.rmtree(churn)
"""


def test_directory_vanishing_mid_walk(tmp_path: Path, write_policy: Policy) -> None:
    root = tmp_path / "var"
    (root / "stable").mkdir(parents=True)
    for i in range(300):
        (root / "stable" / f"s{i:03d}").write_text(f"stable {i}\n")
    run = cli(tmp_path, policy_for(write_policy, root, check="config"))
    assert run("init").exit_code == 0
    churn = root / "churn"
    codes = []
    with background(CHURNER, str(root)):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            result = run("verify", "--json")
            assert result.exit_code in (0, 1), result.output
            assert "Traceback" not in result.output
            doc = json.loads(result.stdout)
            codes.append(result.exit_code)
            for error in doc["errors"]:
                assert set(error) == {"path", "error"}
                assert ERROR_SHAPE.match(error["error"]), error
                assert error["path"].startswith(str(churn)), error
            for change in doc["changes"]:
                # The churn and its parent's times and link count; nothing else.
                assert change["path"] == str(root) or \
                    change["path"].startswith(str(churn)), change
        for _ in range(3):
            result = run("init", "--force")
            assert result.exit_code == 0, result.output
            for line in result.stderr.splitlines():
                assert WARNING_LINE.match(line) and str(churn) in line, line
    assert run("init", "--force").exit_code == 0
    assert verify_doc(run)[0] == 0
    print(f"{len(codes)} verify runs under churn, exit codes {sorted(set(codes))}")


# -- no file content is ever stored -------------------------------------------------

def test_no_file_content_is_ever_stored(tmp_path: Path, write_policy: Policy) -> None:
    marker = b"MARKER-" + os.urandom(16).hex().encode() + b"-END"
    root = tmp_path / "etc"
    root.mkdir()
    (root / "small.conf").write_bytes(b"key = " + marker + b"\n")
    (root / "large.bin").write_bytes(os.urandom(300_000) + marker + os.urandom(300_000))
    (root / "exact").write_bytes(marker)
    os.setxattr(root / "small.conf", "user.note", marker)
    run = cli(tmp_path, policy_for(write_policy, root))
    assert run("init").exit_code == 0
    assert marker not in database_bytes(run.db)
    # Changes carry old and new states into events; approvals write the baseline.
    (root / "small.conf").write_bytes(b"key = " + marker + b" changed\n")
    (root / "added").write_bytes(marker * 3)
    assert verify_doc(run)[0] == 1
    assert run("approve", "--all", "--reason", "marker").exit_code == 0
    assert verify_doc(run)[0] == 0
    assert run("events", "--json").exit_code == 0
    data = database_bytes(run.db)
    assert marker not in data
    assert marker.hex().encode() not in data
    assert blake3.blake3(marker).digest() in data  # the digest is there, the bytes not
