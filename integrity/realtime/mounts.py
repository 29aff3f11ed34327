"""The mount table, and what inotify and fanotify can see on each kind of filesystem.

One parser of /proc/self/mountinfo (our own mount namespace: what the watcher will
see) for the watcher, the fanotify marks, `doctor` and the walk (which reports a
protected file with a filesystem mounted on it), and one table of filesystem kinds, so
that they never disagree about which trees are blind.

Only the standard library (and paths.py) is imported: the fanotify helper process
runs with `python -S` and looks up pseudo filesystems here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from integrity.paths import is_within

#: Anything os.fsencode() takes.
PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]

MOUNTINFO = "/proc/self/mountinfo"

#: Filesystems where changes can be made without passing through this kernel's VFS,
#: so inotify never hears of them: by the server or another client (network), another
#: node (cluster), or the userspace daemon behind the mount (FUSE). Their trees go on
#: scheduled scanning.
NETWORK = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "sshfs", "ceph",
                     "glusterfs", "afs", "coda", "lustre", "gpfs", "beegfs", "orangefs",
                     "davfs"})
CLUSTER = frozenset({"ocfs2", "gfs2"})
#: Pseudo filesystems whose contents the kernel generates without sending any event:
#: inotify cannot watch them, so their trees go on scheduled scanning.
SILENT_PSEUDO = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs",
                           "securityfs", "configfs", "bpf"})
#: Every pseudo filesystem: the kernel makes them up, they hold no files anyone
#: protects, so fanotify never descends into them. Those beyond SILENT_PSEUDO do report
#: changes made through them (inotify events for creating, chmod-ing and writing were
#: seen on devpts, mqueue and hugetlbfs), so a rule that covers them stays watched.
PSEUDO = SILENT_PSEUDO | frozenset({"devpts", "pstore", "mqueue", "fusectl", "binfmt_misc",
                                    "autofs", "efivarfs", "nsfs", "selinuxfs",
                                    "hugetlbfs", "rpc_pipefs"})
#: Filesystems inotify sees only partly. virtiofs reports changes made inside this
#: guest, but not those made by the host or another guest sharing the directory. Such
#: a tree is often the guest's root, so it stays watched (local changes are real-time)
#: and the scheduled full scan catches the rest; doctor says so. overlay is not listed:
#: changes through the overlay are seen, and its lower layers belong to the host.
PARTIAL = {
    "virtiofs": "changes made by the host or other guests sharing it are not seen",
}


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where it is mounted and what it is."""

    mount_point: bytes
    fstype: str
    source: str
    #: st_dev of the files on it (from the major:minor field).
    device: int


def unescape(field: str) -> bytes:
    """Mount points escape space, tab, newline and backslash as \\ooo octal."""
    raw = os.fsencode(field)
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def parse(text: str) -> list[Mount]:
    """mountinfo(5) lines, in mount order (a later mount on the same point hides earlier).

    Fields: id parent major:minor root mount-point options [optional...] - fstype
    source super-options. The optional fields vary, hence the search for " - ".
    Malformed lines are skipped.
    """
    mounts: list[Mount] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 5 or not rest[0]:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            device = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        mounts.append(Mount(unescape(fields[4]), rest[0], rest[1] if len(rest) > 1 else "",
                            device))
    return mounts


def read_mounts(mountinfo: str = MOUNTINFO) -> list[Mount]:
    """The mounts of our namespace; [] when mountinfo cannot be read."""
    try:
        with open(mountinfo, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return []
    return parse(text)


def pseudo_devices(mounts: Iterable[Mount]) -> set[int]:
    """st_dev of every mounted pseudo filesystem (PSEUDO)."""
    return {m.device for m in mounts if m.fstype in PSEUDO}


def _locate(path: bytes) -> bytes:
    """Where the entry at path really lives: its parent resolved, its name kept.

    A rule root that is itself a symlink is recorded as a link (never followed), so
    it lives where its parent is; symlinks further up (/bin -> usr/bin) are resolved.
    """
    if path == b"/":
        return path
    parent, name = os.path.split(path.rstrip(b"/"))
    real_parent = os.path.realpath(parent or b"/")
    return os.path.join(real_parent, name)


def mount_of(path: PathArg, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount holding path: the longest mount point containing it, None if none."""
    target = _locate(os.fsencode(path))
    best: Mount | None = None
    for mount in mounts if mounts is not None else read_mounts():
        if is_within(target, mount.mount_point) and (
                best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def filesystem_type(path: PathArg, mounts: list[Mount] | None = None) -> str:
    """The type of the filesystem holding path ("ext4", "nfs4", "fuse.sshfs", ...).

    "" when unknown.
    """
    mount = mount_of(path, mounts)
    return mount.fstype if mount is not None else ""


def blind_reason(fstype: str) -> str | None:
    """Why inotify cannot be trusted on this filesystem type, or None when it can."""
    if fstype in NETWORK:
        return "a network filesystem: changes made by the server or other clients are not seen"
    if fstype in CLUSTER:
        return "a cluster filesystem: changes made by other nodes are not seen"
    if fstype in ("fuse", "fuseblk") or fstype.startswith("fuse."):
        return "a FUSE filesystem: changes made behind its userspace daemon are not seen"
    if fstype in SILENT_PSEUDO:
        return "a pseudo filesystem: its contents are generated by the kernel, without events"
    return None


def is_blind(fstype: str) -> bool:
    """True when inotify cannot be trusted to see changes on this filesystem type."""
    return blind_reason(fstype) is not None


def partial_note(fstype: str) -> str | None:
    """Why inotify sees only some changes on this type, or None when it sees them all."""
    return PARTIAL.get(fstype)


def unwatchable(paths: Iterable[PathArg],
                mounts: list[Mount] | None = None) -> list[tuple[bytes, str]]:
    """(path, fstype) for each path on a filesystem inotify cannot see.

    Only the paths themselves are looked up; a blind filesystem mounted further down
    a tree is found by giving the mount points as paths too (see `blind_mounts_below`).
    """
    table = mounts if mounts is not None else read_mounts()
    found: list[tuple[bytes, str]] = []
    for path in paths:
        raw = os.fsencode(path)
        fstype = filesystem_type(raw, table)
        if is_blind(fstype):
            found.append((raw, fstype))
    return found


def blind_mounts_below(root: bytes, mounts: list[Mount] | None = None,
                       ) -> list[tuple[bytes, str]]:
    """Mounts strictly below root whose filesystem inotify cannot see."""
    table = mounts if mounts is not None else read_mounts()
    real = os.path.realpath(root)
    return [(m.mount_point, m.fstype) for m in table
            if m.mount_point != real and is_within(m.mount_point, real) and is_blind(m.fstype)]
