"""`doctor`: inotify needs and limits, who holds inotify, filesystems, permissions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from integrity import doctor
from integrity.doctor import diagnose, render
from integrity.doctor.filesystems import check_filesystems
from integrity.doctor.findings import Diagnosis, Finding
from integrity.doctor.inotify import (InotifyHolder, InotifyLimits, check_inotify,
                                      inotify_holders, suggested_limit,
                                      watches_needed)
from integrity.doctor.permissions import check_permissions
from integrity.realtime.mounts import (Mount, blind_reason, filesystem_type, is_blind,
                                       partial_note, read_mounts, unwatchable)
from integrity.policy import Policy, parse

MAX_WATCHES = "/proc/sys/fs/inotify/max_user_watches"
ROOMY = InotifyLimits(1_000_000, 1024, 16384)


def policy_for(*rules: dict[str, object]) -> Policy:
    return parse({"rule": list(rules)})


def make_dirs(root: Path, count: int) -> None:
    """root plus count - 1 directories below it, some nested, with files between."""
    root.mkdir(exist_ok=True)
    for i in range(count - 1):
        parent = root / f"d{i // 10}" if i % 10 and (root / f"d{i // 10}").exists() else root
        (parent / f"d{i}").mkdir()
        (parent / f"d{i}" / "f").write_text("x")


def test_watches_needed_counts_directories(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_dirs(root, 25)
    # Neither a symlink to a directory nor an excluded directory needs a watch.
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    (root / "cache" / "deep").mkdir(parents=True)
    need = watches_needed(policy_for({"path": str(root), "exclude": [f"{root}/cache"]}))
    assert need.directories == 25
    assert need.unlisted == ()


def test_watches_needed_for_nested_rules_counts_each_directory_once(tmp_path: Path) -> None:
    make_dirs(tmp_path / "tree", 12)
    policy = policy_for({"path": str(tmp_path / "tree")},
                        {"path": str(tmp_path / "tree" / "d0"), "check": "static"})
    assert watches_needed(policy).directories == 12


def test_non_recursive_rule_needs_one_watch(tmp_path: Path) -> None:
    """Its child directories are recorded, but the root's watch reports on them."""
    make_dirs(tmp_path / "tree", 12)
    assert watches_needed(policy_for({"path": str(tmp_path / "tree"),
                                      "recursive": False})).directories == 1


def test_unlistable_directories_are_reported(world_dir: Path) -> None:
    make_dirs(world_dir / "tree", 3)
    (world_dir / "tree" / "d0").chmod(0)
    policy = policy_for({"path": str(world_dir / "tree")})
    try:
        if os.geteuid() == 0:  # root lists anything: look as nobody
            os.seteuid(65534)
        need = watches_needed(policy)
    finally:
        if os.geteuid() != os.getuid():
            os.seteuid(os.getuid())
        (world_dir / "tree" / "d0").chmod(0o755)
    # tree and d0 (d1 inside d0 is out of sight): d0 is counted, it is there to watch.
    assert need.directories == 2
    assert [w.path for w in need.unlisted] == [os.fsencode(world_dir / "tree" / "d0")]


@pytest.fixture
def own_inotify(tmp_path: Path) -> Iterator[INotify]:
    """An inotify instance of this process with exactly three watches."""
    inotify = INotify()
    try:
        for name in ("w1", "w2", "w3"):
            (tmp_path / name).mkdir()
            inotify.add_watch(str(tmp_path / name), flags.CREATE)
        yield inotify
    finally:
        inotify.close()


def ours(holders: list[InotifyHolder]) -> tuple[int, int]:
    for holder in holders:
        if holder.pid == os.getpid():
            return holder.instances, holder.watches
    return 0, 0


def test_holders_list_our_own_instance(tmp_path: Path) -> None:
    before = ours(inotify_holders())
    inotify = INotify()
    try:
        for name in ("w1", "w2", "w3"):
            (tmp_path / name).mkdir()
            inotify.add_watch(str(tmp_path / name), flags.CREATE)
        holders = inotify_holders()
        instances, watches = ours(holders)
        assert (instances - before[0], watches - before[1]) == (1, 3)
        me = next(h for h in holders if h.pid == os.getpid())
        assert me.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert not me.is_watcher
        assert holders == sorted(holders, key=lambda h: (-h.watches, -h.instances, h.pid))
    finally:
        inotify.close()
    assert ours(inotify_holders()) == before


def test_an_instance_without_watches_still_counts() -> None:
    before = ours(inotify_holders())
    with INotify():
        assert ours(inotify_holders()) == (before[0] + 1, before[1])


def test_other_users_processes_are_not_counted(own_inotify: INotify) -> None:
    assert os.getpid() not in {h.pid for h in inotify_holders(uid=os.geteuid() + 12345)}


def test_holders_appear_in_the_diagnosis(tmp_path: Path, own_inotify: INotify) -> None:
    make_dirs(tmp_path / "tree", 3)
    holders = [InotifyHolder(os.getpid(), "pytest", 1, 3)]
    (finding,) = check_inotify(policy_for({"path": str(tmp_path / "tree")}), ROOMY, holders)
    assert finding.level == "ok"
    assert "needs 3 watches" in finding.message and "hold 3" in finding.message
    assert finding.details == (f"pid {os.getpid()} (pytest): 1 instance, 3 watches",)


@pytest.fixture
def fake_watcher(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line is `integrity watch`, holding two watches."""
    script = tmp_path / "bin" / "integrity"
    script.parent.mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from inotify_simple import INotify, flags
        inotify = INotify()
        inotify.add_watch({str(tmp_path / "a")!r}, flags.CREATE)
        inotify.add_watch({str(tmp_path / "b")!r}, flags.CREATE)
        print("ready", flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script), "watch"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_running_watcher_is_not_counted_twice(tmp_path: Path,
                                                fake_watcher: subprocess.Popen[bytes]) -> None:
    holders = inotify_holders()
    watcher = next(h for h in holders if h.pid == fake_watcher.pid)
    assert watcher.is_watcher and (watcher.instances, watcher.watches) == (1, 2)
    make_dirs(tmp_path / "tree", 2)
    findings = list(check_inotify(policy_for({"path": str(tmp_path / "tree")}),
                                  InotifyLimits(3, 1, 16384), [watcher]))
    # 2 needed + the watcher's own 2 would be over a limit of 3; they are the same 2.
    assert [f.level for f in findings] == ["ok"]
    assert "already counted as needed" in findings[0].details[0]


def test_watch_limit_lowered_below_need_fails(tmp_path: Path) -> None:
    """With the real sysctl lowered, diagnose() fails and names the sysctl to raise."""
    if os.geteuid() != 0 or not os.access(MAX_WATCHES, os.W_OK):
        pytest.skip("needs root and a writable /proc/sys/fs/inotify")
    need = 1000
    make_dirs(tmp_path / "tree", need)
    policy = policy_for({"path": str(tmp_path / "tree")})
    assert watches_needed(policy).directories == need
    used = sum(h.watches for h in inotify_holders() if not h.is_watcher)
    original = Path(MAX_WATCHES).read_text()
    # Below used + need, but with room to spare either way: other processes (other
    # test runs on this machine) can still add watches while it is lowered, and ours
    # still fails if some of theirs go away meanwhile.
    lowered = used + need // 2
    try:
        Path(MAX_WATCHES).write_text(f"{lowered}\n")
        diagnosis = diagnose(policy)
    finally:
        Path(MAX_WATCHES).write_text(original)
    assert Path(MAX_WATCHES).read_text() == original
    assert diagnosis.exit_code == 1
    (failed,) = [f for f in diagnosis.findings if f.level == "fail"]
    assert f"max_user_watches={lowered:,}" in failed.message
    assert failed.advice is not None
    assert failed.advice.startswith("sysctl -w fs.inotify.max_user_watches=")
    suggested = int(failed.advice.split("=")[1].split(";")[0])
    assert suggested >= 1.5 * (used + need)
    assert f"fs.inotify.max_user_watches = {suggested}' > /etc/sysctl.d/" in failed.advice
    text = render(diagnosis)
    assert "FAIL  inotify:" in text and "fix: sysctl -w fs.inotify.max_user_watches=" in text


def test_limits_with_thin_headroom_warn_and_instances_fail(tmp_path: Path) -> None:
    make_dirs(tmp_path / "tree", 10)
    policy = policy_for({"path": str(tmp_path / "tree")})
    busy = [InotifyHolder(4242, "syncthing", 8, 75)]
    watches, instances, queue = check_inotify(policy, InotifyLimits(100, 8, 1024), busy)
    assert watches.level == "warn" and "85%" in watches.message
    assert instances.level == "fail" and "max_user_instances=8" in instances.message
    assert instances.advice is not None and "max_user_instances=256" in instances.advice
    assert queue.level == "warn" and "max_queued_events=1,024" in queue.message
    assert watches.details == ("pid 4242 (syncthing): 8 instances, 75 watches",)


def test_suggested_limit_is_round_and_roomy() -> None:
    for needed in (1, 900, 12_345, 192_536, 1_234_567):
        value = suggested_limit(needed)
        assert value >= needed * 1.5
        assert str(value).rstrip("0") and len(str(value).rstrip("0")) <= 2
    assert suggested_limit(192_536) == 290_000


# --- filesystems -------------------------------------------------------------------

@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse", "fuseblk",
                                    "fuse.sshfs", "fuse.rclone", "sshfs", "9p", "ceph",
                                    "glusterfs", "gfs2", "proc", "sysfs"])
def test_blind_filesystem_types(fstype: str) -> None:
    assert is_blind(fstype)
    assert blind_reason(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs",
                                    "vfat", "virtiofs", ""])
def test_local_filesystem_types(fstype: str) -> None:
    assert not is_blind(fstype)


def test_virtiofs_is_watched_with_a_note() -> None:
    assert partial_note("virtiofs") and partial_note("ext4") is None


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs mounted under tmp_path (needs root)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "integrity-test",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_filesystem_type_of_a_real_tmpfs(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "sub").mkdir()
    (tmpfs / "sub" / "f").write_text("x")
    underlying = filesystem_type(tmp_path)
    assert filesystem_type(tmpfs) == "tmpfs"
    assert filesystem_type(os.fsencode(tmpfs / "sub" / "f")) == "tmpfs"
    assert filesystem_type(tmpfs / "not-yet-created") == "tmpfs"
    assert filesystem_type(tmp_path / "beside") == underlying
    # Through a symlink further up, the entry lives where the link points.
    os.symlink(tmpfs, tmp_path / "alias")
    assert filesystem_type(tmp_path / "alias" / "sub") == "tmpfs"
    # A rule root that is itself a symlink is recorded as a link: it lives beside.
    assert filesystem_type(tmp_path / "alias") == underlying
    assert unwatchable([tmpfs, str(tmpfs / "sub")]) == []
    policy = policy_for({"path": str(tmpfs)})
    assert [f.level for f in check_filesystems(policy, read_mounts())] == ["ok"]


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
60 27 0:50 / {root}/share rw,relatime shared:30 - nfs4 server:/export rw,vers=4.2
61 60 0:51 / {root}/share/local\\040disk rw master:2 - ext4 /dev/vdb rw
62 27 0:52 / {root}/remote rw,nosuid - fuse.sshfs me@host:/srv rw,user_id=0
63 27 0:53 / {root}/guest rw - virtiofs hostshare rw
"""


@pytest.fixture
def mounts(tmp_path: Path) -> list[Mount]:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.format(root=tmp_path))
    for name in ("share", "share/local disk", "remote", "guest", "plain"):
        (tmp_path / name).mkdir(parents=True)
    return read_mounts(str(info))


def test_read_mounts_parses_optional_fields_and_escapes(mounts: list[Mount],
                                                        tmp_path: Path) -> None:
    assert [m.fstype for m in mounts] == ["proc", "ext4", "nfs4", "ext4", "fuse.sshfs",
                                          "virtiofs"]
    assert mounts[3].mount_point == os.fsencode(tmp_path / "share" / "local disk")
    assert mounts[2].source == "server:/export"


def test_longest_mount_point_wins(mounts: list[Mount], tmp_path: Path) -> None:
    assert filesystem_type(tmp_path / "share" / "x", mounts) == "nfs4"
    assert filesystem_type(tmp_path / "share" / "local disk" / "x", mounts) == "ext4"
    assert filesystem_type(tmp_path / "sharer", mounts) == "ext4"  # not a prefix match
    assert filesystem_type(tmp_path / "remote", mounts) == "fuse.sshfs"
    assert filesystem_type("/proc/self/status", mounts) == "proc"
    assert filesystem_type("/proc/self/status", []) == ""


def test_unwatchable_flags_network_and_fuse(mounts: list[Mount], tmp_path: Path) -> None:
    paths = [tmp_path / "share", tmp_path / "remote" / "etc", tmp_path / "plain",
             tmp_path / "guest", tmp_path / "share" / "local disk"]
    assert unwatchable(paths, mounts) == [
        (os.fsencode(tmp_path / "share"), "nfs4"),
        (os.fsencode(tmp_path / "remote" / "etc"), "fuse.sshfs")]


def test_check_filesystems_warns_per_rule(mounts: list[Mount], tmp_path: Path) -> None:
    policy = policy_for({"path": str(tmp_path / "share")},
                        {"path": str(tmp_path / "guest")},
                        {"path": str(tmp_path / "plain")})
    findings = list(check_filesystems(policy, mounts))
    assert [f.level for f in findings] == ["warn", "warn"]
    guest, share = sorted(findings, key=lambda f: f.message)
    assert "on nfs4, a network filesystem" in share.message
    assert share.advice is not None and "full_scan" in share.advice
    assert "virtiofs" in guest.message and "only local changes" in guest.message


def test_a_rule_crossing_mounts_finds_blind_mounts_below(mounts: list[Mount],
                                                         tmp_path: Path) -> None:
    crossing = policy_for({"path": str(tmp_path), "one_filesystem": False})
    messages = [f.message for f in check_filesystems(crossing, mounts)]
    assert len(messages) == 2
    assert any("share is on nfs4" in m for m in messages)
    assert any("remote is on fuse.sshfs" in m for m in messages)
    # Staying on one filesystem, the walk never enters them: nothing to warn about.
    staying = policy_for({"path": str(tmp_path)})
    assert [f.level for f in check_filesystems(staying, mounts)] == ["ok"]


# --- permissions and the whole diagnosis ------------------------------------------

def test_missing_rule_paths_are_listed_not_warned(tmp_path: Path) -> None:
    # SPEC (policies that protect what attackers touch): a rule whose path is absent
    # is skipped quietly and watched for creation; doctor lists it.
    (tmp_path / "home" / "alice").mkdir(parents=True)
    policy = policy_for({"path": str(tmp_path / "boot")}, {"path": str(tmp_path)},
                        {"path": str(tmp_path / "home" / "*" / ".ssh")})
    findings = [f for f in check_permissions(policy) if "absent" in f.message]
    assert [(f.level, f.message, f.details) for f in findings] == [
        ("ok", "2 rule paths absent on this host: skipped by init and verify, watched "
               "for creation",
         (str(tmp_path / "boot"), f"{tmp_path}/home/*/.ssh (no match now)"))]
    (tmp_path / "home" / "alice" / ".ssh").mkdir()
    findings = [f for f in check_permissions(policy) if "absent" in f.message]
    assert [f.details for f in findings] == [(str(tmp_path / "boot"),)]


def test_non_root_is_warned(tmp_path: Path, world_dir: Path) -> None:
    policy = policy_for({"path": str(world_dir)}, {"path": str(tmp_path / "private")})
    (tmp_path / "private").mkdir()
    try:
        if os.geteuid() == 0:
            os.seteuid(65534)
        findings = list(check_permissions(policy))
    finally:
        if os.geteuid() != os.getuid():
            os.seteuid(os.getuid())
    finding, *rest = findings
    assert finding.level == "warn"
    assert "not root" in finding.message and "reported as errors" in finding.message
    if os.getuid() == 0:  # tmp_path lies in root's 0700 pytest directory
        assert [f.message for f in rest] == [
            f"rule {tmp_path / 'private'}: lstat failed: Permission denied"
            " (nothing below it can be checked)"]


def test_clean_diagnosis_exits_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("as a non-root user doctor always warns")
    # Roomy limits of the test's own: the host's are shared with other test runs,
    # which lower them for a while and hold watches of their own.
    sysctl = tmp_path / "sysctl"
    sysctl.mkdir()
    for name, value in (("max_user_watches", ROOMY.max_user_watches),
                        ("max_user_instances", ROOMY.max_user_instances),
                        ("max_queued_events", ROOMY.max_queued_events)):
        (sysctl / name).write_text(f"{value}\n")
    read_limits = doctor.inotify_limits
    monkeypatch.setattr(doctor, "inotify_limits", lambda: read_limits(str(sysctl)))
    make_dirs(tmp_path / "tree", 4)
    diagnosis = diagnose(policy_for({"path": str(tmp_path / "tree")}))
    assert [f.level for f in diagnosis.findings] == ["ok", "ok", "ok", "ok"], \
        render(diagnosis)
    assert "fanotify: realtime events name the process" in render(diagnosis)
    assert diagnosis.exit_code == 0
    assert render(diagnosis).endswith("all checks passed\n")


def test_render_shows_level_details_and_advice() -> None:
    diagnosis = Diagnosis([
        Finding("ok", "fine"),
        Finding("warn", "hmm", "do this", ("detail one",)),
    ])
    assert diagnosis.exit_code == 1
    assert render(diagnosis) == (
        "ok    fine\n"
        "WARN  hmm\n"
        "        detail one\n"
        "      fix: do this\n"
        "1 check needs attention\n")


HOLDER = """
import sys
from inotify_simple import INotify, flags
inotify = INotify()
for path in sys.argv[1:]:
    inotify.add_watch(path, flags.CREATE)
print("watching", flush=True)
sys.stdin.read()
"""


def test_holders_survive_processes_exiting_mid_scan(tmp_path: Path) -> None:
    """Processes come and go while /proc is read; none of that may raise, and only the
    live holder is listed.

    A /proc of our own (the `proc` argument) holds links to the real /proc entries of
    three children, each in a state the real /proc shows at some moment of an exit:
    one still holding an inotify instance with two watches, a zombie (its status is
    still there, its descriptors are gone) and one already reaped (its entry vanished
    after the listing).
    """
    for name in ("w1", "w2"):
        (tmp_path / name).mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "w1"),
                               str(tmp_path / "w2")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "watching\n"
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        reaped.wait()
        proc = tmp_path / "proc"
        proc.mkdir()
        for child in (holder, zombie, reaped):
            os.symlink(f"/proc/{child.pid}", proc / str(child.pid))
        assert Path(f"/proc/{zombie.pid}/status").exists()
        assert not (proc / str(reaped.pid)).exists()

        comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
        assert inotify_holders(proc=str(proc)) == [InotifyHolder(holder.pid, comm, 1, 2)]
    finally:
        holder.kill()
        holder.communicate()
        zombie.wait()
        reaped.wait()
