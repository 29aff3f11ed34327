"""fanotify(7) over the protected trees: the ctypes binding and the marks it keeps.

The lower half is the raw interface (constants, init, mark, handles, event parsing);
the upper half, `Tracker`, marks the trees and turns each event into (path, pid). What
a pid means (the process behind it) is actor.py's business; byte offsets are this
module's. Layouts follow the kernel's uapi header
(include/uapi/linux/fanotify.h): `struct fanotify_event_metadata` is 24 bytes with the
64-bit mask naturally aligned at offset 8; each info record starts with a 4-byte header
(info_type u8, pad u8, len u16), and a file-id record continues with the filesystem id
(2 x s32) and a `struct file_handle` (handle_bytes u32, handle_type s32, f_handle[]),
followed, in a DFID_NAME record, by the NUL-terminated entry name.

Only the standard library (and paths.py) is imported: the helper process starts with
`python -S`, and an unprivileged probe runs this under Debian's /usr/bin/python3,
neither of which can be assumed to see the project's dependencies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from integrity.paths import display, is_within

# Events (what happened).
FAN_MODIFY = 0x00000002
FAN_ATTRIB = 0x00000004
FAN_CLOSE_WRITE = 0x00000008
FAN_MOVED_FROM = 0x00000040
FAN_MOVED_TO = 0x00000080
FAN_CREATE = 0x00000100
FAN_DELETE = 0x00000200
FAN_Q_OVERFLOW = 0x00004000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000

# fanotify_init() flags. FAN_CLASS_NOTIF is 0: notification only, the kernel never
# waits for us (permission classes would let a slow reader stall every writer).
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_FID = 0x00000200
FAN_REPORT_DIR_FID = 0x00000400
FAN_REPORT_NAME = 0x00000800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark() flags.
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_ONLYDIR = 0x00000008
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_FILESYSTEM = 0x00000100

# Info record types.
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3

FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
#: name_to_handle_at(): a handle that identifies, even where it cannot be decoded
#: (Linux 6.5+; fanotify encodes event ids the same way, so the two compare equal).
AT_HANDLE_FID = 0x200
MAX_HANDLE_SZ = 128

METADATA = struct.Struct("=IBBHQii")
INFO_HEADER = struct.Struct("=BBH")
_HANDLE_HEAD = struct.Struct("=Ii")
#: Offset of f_handle in a file-id record: header 4, fsid 8, handle head 8.
_FH_OFFSET = INFO_HEADER.size + 8 + _HANDLE_HEAD.size

assert METADATA.size == 24


class _Libc:
    """The three libc entry points, bound lazily so importing never fails."""

    def __init__(self) -> None:
        self._lib: Any = None

    def get(self) -> Any:
        if self._lib is None:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
            lib.fanotify_init.restype = ctypes.c_int
            lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                          ctypes.c_int, ctypes.c_char_p]
            lib.fanotify_mark.restype = ctypes.c_int
            lib.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                              ctypes.c_void_p,
                                              ctypes.POINTER(ctypes.c_int), ctypes.c_int]
            lib.name_to_handle_at.restype = ctypes.c_int
            self._lib = lib
        return self._lib


_libc = _Libc()


def _error(path: bytes | None = None) -> OSError:
    """The OSError for the errno ctypes saved, as os functions raise it."""
    code = ctypes.get_errno()
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), os.fsdecode(path))


def init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2); the new descriptor, or OSError (ENOSYS when libc lacks it)."""
    try:
        lib = _libc.get()
        fn = lib.fanotify_init
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, f"fanotify_init: not in this libc ({exc})") from None
    fd = fn(flags, event_f_flags)
    if fd < 0:
        raise _error()
    return int(fd)


def mark(fan_fd: int, flags: int, mask: int, dirfd: int = AT_FDCWD,
         path: bytes | None = None) -> None:
    """fanotify_mark(2). With path None, the object is the open descriptor dirfd."""
    if _libc.get().fanotify_mark(fan_fd, flags, mask, dirfd, path) != 0:
        raise _error(path)


def handle_key(fd: int) -> bytes:
    """The bytes an event's file-id record carries for the directory open at fd.

    fsid (from fstatfs, as the kernel reports it) + handle_bytes + handle_type +
    f_handle: exactly the slice `events()` yields as the key, so a dict lookup maps an
    event to the directory it names. AT_HANDLE_FID first (it also works where handles
    cannot be decoded, ramfs for one); plain handles on kernels that predate it.
    """
    fsid = os.fstatvfs(fd).f_fsid
    # glibc folds the kernel's two 32-bit words into one: val[0] low, val[1] high.
    head = struct.pack("=II", fsid & 0xFFFFFFFF, (fsid >> 32) & 0xFFFFFFFF)
    lib = _libc.get()
    buf = ctypes.create_string_buffer(_HANDLE_HEAD.size + MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    for flags in (AT_EMPTY_PATH | AT_HANDLE_FID, AT_EMPTY_PATH):
        _HANDLE_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
        if lib.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), flags) == 0:
            size = _HANDLE_HEAD.unpack_from(buf, 0)[0]
            return head + buf.raw[:_HANDLE_HEAD.size + size]
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: AT_HANDLE_FID unknown here
            break
    raise _error()


#: (mask, pid, fd, dir_key, name), see events().
Event = tuple[int, int, int, bytes | None, bytes | None]


def events(buf: bytes) -> Iterator[Event]:
    """(mask, pid, fd, dir_key, name) for each event in what one read() returned.

    dir_key is the directory's id (see handle_key) from a DFID_NAME or DFID record
    and name the entry in it (b"." for the directory itself); both are None in
    classic mode, where fd is an open descriptor of the object instead (the caller
    must close it). Raises ValueError on a metadata version we do not know.
    """
    end = len(buf)
    off = 0
    unpack_meta = METADATA.unpack_from
    unpack_info = INFO_HEADER.unpack_from
    unpack_handle = _HANDLE_HEAD.unpack_from
    while off + METADATA.size <= end:
        event_len, vers, _, meta_len, mask, fd, pid = unpack_meta(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected "
                             f"{FANOTIFY_METADATA_VERSION}")
        if event_len < METADATA.size or off + event_len > end:
            return
        key: bytes | None = None
        name: bytes | None = None
        rec = off + meta_len
        stop = off + event_len
        while rec + INFO_HEADER.size <= stop:
            info_type, _, length = unpack_info(buf, rec)
            if length < INFO_HEADER.size:
                break
            if key is None and info_type in (FAN_EVENT_INFO_TYPE_DFID_NAME,
                                             FAN_EVENT_INFO_TYPE_DFID):
                size = unpack_handle(buf, rec + INFO_HEADER.size + 8)[0]
                name_at = rec + _FH_OFFSET + size
                key = buf[rec + INFO_HEADER.size:name_at]
                if info_type == FAN_EVENT_INFO_TYPE_DFID_NAME:
                    nul = buf.find(b"\0", name_at, rec + length)
                    name = buf[name_at:nul if nul >= 0 else rec + length]
                else:
                    name = b"."
            rec += length
        yield mask, pid, fd, key, name
        off += event_len


# -- the marks over the protected trees --------------------------------------------------

#: What an inode mark on a protected directory asks for (FID mode only). Not
#: FAN_MODIFY unless asked: it fires on every write() call (200,000 appends of 512 bytes
#: ran 75-105% slower with it, 7-10% without), and the watcher raises realtime events
#: on IN_CLOSE_WRITE, when FAN_CLOSE_WRITE names the closer anyway.
DIR_MASK = (FAN_CLOSE_WRITE | FAN_ATTRIB | FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM
            | FAN_MOVED_TO | FAN_EVENT_ON_CHILD | FAN_ONDIR)
#: Classic mode (an fd per event) can only report writes.
CLASSIC_MASK = FAN_CLOSE_WRITE
_GROWN = FAN_CREATE | FAN_MOVED_TO
#: FID events are ~60 bytes; classic ones carry an open fd each, so read fewer at once.
FID_READ = 65536
CLASSIC_READ = 4096

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_EVENT_F_FLAGS = (os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
                  | getattr(os, "O_LARGEFILE", 0))
#: Filesystems never descended into: they hold no files anyone protects.
_PSEUDO = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs",
                     "securityfs", "pstore", "bpf", "mqueue", "configfs", "fusectl",
                     "binfmt_misc", "autofs", "efivarfs", "nsfs", "selinuxfs",
                     "hugetlbfs", "rpc_pipefs"})
#: fanotify_mark() errors that mean "this filesystem cannot give file ids".
_NO_FID_ERRORS = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL,
                            errno.ENOSYS, errno.ESTALE})

NOT_ROOT = ("fanotify unavailable: not running as root (the kernel tells the writers' "
            "process ids only to a listener with CAP_SYS_ADMIN)")
NO_FID = "does not support fanotify file ids"
CLASSIC_CONSEQUENCE = ("only writes are attributed there (classic mode): attribute "
                       "changes, creations, removals and renames have no actor")


def _join(base: bytes, name: bytes) -> bytes:
    return base + name if base == b"/" else base + b"/" + name


def read_small(path: bytes, limit: int = 1 << 22) -> bytes:
    """A whole /proc or /sys file (they are small, and their size lies to stat)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def init_problem(exc: OSError) -> str:
    """The sentence for a refused fanotify_init()."""
    if exc.errno == errno.EPERM:
        return NOT_ROOT
    if exc.errno == errno.ENOSYS:
        return "fanotify unavailable: this kernel was built without fanotify"
    if exc.errno == errno.EMFILE:
        return ("fanotify unavailable: too many fanotify groups "
                "(fs.fanotify.max_user_groups) or open files")
    return f"fanotify unavailable: fanotify_init failed: {exc.strerror}"


def _mark_error(path: bytes, exc: OSError) -> str:
    """The per-subtree sentence for a mark the kernel refused."""
    if exc.errno == errno.ENOSPC:
        try:
            limit = read_small(b"/proc/sys/fs/fanotify/max_user_marks").decode().strip()
        except OSError:
            limit = "?"
        return (f"fanotify mark limit reached at '{display(path)}' "
                f"(fs.fanotify.max_user_marks={limit}): raise it with sysctl")
    return f"fanotify_mark failed for '{display(path)}': {exc.strerror}"


def _pseudo_devices() -> set[int]:
    """st_dev of every mounted pseudo filesystem (from /proc/self/mountinfo)."""
    found: set[int] = set()
    try:
        text = read_small(b"/proc/self/mountinfo").decode("utf-8", "replace")
    except OSError:
        return found
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        if sep and len(fields) > 2 and tail.split(" ")[0] in _PSEUDO:
            major, _, minor = fields[2].partition(":")
            found.add(os.makedev(int(major), int(minor)))
    return found


def normalise_roots(roots: Iterable[bytes]) -> list[bytes]:
    """Absolute roots without trailing slashes; those inside another root dropped."""
    clean = sorted({r if r == b"/" else os.path.normpath(r) for r in roots
                    if r.startswith(b"/")})
    kept: list[bytes] = []
    for root in clean:
        if not any(is_within(root, k) for k in kept):
            kept.append(root)
    return kept


class Tracker:
    """fanotify marks over the protected trees, and the (path, pid) of their events.

    FID mode (FAN_REPORT_DFID_NAME): an inode mark with FAN_EVENT_ON_CHILD on every
    directory, whose handle (name_to_handle_at) maps events back to its path; new and
    renamed directories are marked, and removed or moved-away ones forgotten, as their
    events arrive. Each root's parent is marked too (`inside` False: only the root's
    own name counts there) so a file root, or a root created later, is seen. Where FID
    mode is refused, classic mode: a filesystem mark, paths from the event's fd. Used from
    one thread: start(), then read() and paths() as the descriptors become readable.
    """

    def __init__(self, roots: Iterable[bytes], fid: bool = True,
                 modify: bool = False) -> None:
        self.roots = normalise_roots(roots)
        self.root_set = frozenset(self.roots)
        self.fid_fd = -1
        self.classic_fd = -1
        self.mode = "none"
        #: handle key -> (path, inside a root)
        self.dirs: dict[bytes, tuple[bytes, bool]] = {}
        self._keys: dict[bytes, bytes] = {}  # path -> handle key, the reverse of dirs
        #: Subtrees with no marks at all, and why (replaced, never changed in place).
        self.dark: dict[bytes, str] = {}
        #: Subtrees watched in classic mode, and what that costs.
        self.classic: dict[bytes, str] = {}
        self.root_reasons: dict[bytes, str] = {}
        self._want_fid = fid
        self._extra = FAN_MODIFY if modify else 0
        self._pseudo: set[int] = set()

    # -- set-up ---------------------------------------------------------------------

    def start(self) -> str | None:
        """Open the group(s) and mark every root; a sentence when nothing can work."""
        self._pseudo = _pseudo_devices()
        refused = "FID mode switched off"
        if self._want_fid:
            try:
                self.fid_fd = init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_CLOEXEC
                                   | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return init_problem(exc)
                refused = "this kernel cannot report file ids (needs Linux 5.9)"
        for root in self.roots:
            if self.fid_fd >= 0:
                self._watch_fid(root)
            elif not self._watch_classic(root, refused) and self.classic_fd < 0:
                return self.dark[root]  # fanotify_init refused: nothing can work
        for prefix, why in [*self.dark.items(), *self.classic.items()]:
            for root in self.roots:
                if is_within(prefix, root) or is_within(root, prefix):
                    self.root_reasons.setdefault(root, why)
        if not self.dirs and not self.classic:
            return "fanotify unavailable: " + ("; ".join(
                f"{display(r)}: {w}" for r, w in self.root_reasons.items())
                or "no protected trees")
        self.mode = ("fid" if self.classic_fd < 0 else
                     "classic" if self.fid_fd < 0 else "fid+classic")
        return None

    @property
    def fds(self) -> list[int]:
        """The descriptors to poll."""
        return [fd for fd in (self.fid_fd, self.classic_fd) if fd >= 0]

    def _watch_fid(self, root: bytes) -> None:
        try:
            st: os.stat_result | None = os.lstat(root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self._note_dark(root, f"cannot watch '{display(root)}': {exc.strerror}")
            return
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if is_dir:
            self.mark_tree(root)
        if root == b"/" or self.covering_root(os.path.dirname(root)) is not None:
            return
        parent = os.path.dirname(root)
        try:
            fd = os.open(parent, _DIR_OPEN)
        except OSError as exc:
            if st is None and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._note_dark(root, f"'{display(root)}' and its parent do not exist")
            elif not is_dir:
                self._note_dark(root, f"cannot watch '{display(root)}': its parent "
                                      f"cannot be opened ({exc.strerror})")
            return
        try:
            refused = self._mark_fd(parent, fd, False)
        finally:
            os.close(fd)
        if refused is not None and not is_dir:
            self._refused(root, refused)

    def mark_tree(self, top: bytes) -> None:
        """Mark top and every directory below it, each before it is listed.

        Marking first means a directory created after the listing is reported (and
        marked in turn) by the mark on its parent: nothing slips between the two.
        Subdirectories are opened with O_NOFOLLOW and checked against the inode the
        listing gave, so a directory swapped for a symlink cannot lead us out.
        """
        stack: list[tuple[bytes, int | None]] = [(top, None)]
        while stack:
            path, inode = stack.pop()
            try:
                fd = os.open(path, _DIR_OPEN)
            except OSError:
                continue  # gone, or no longer a directory
            try:
                st = os.fstat(fd)
                if (inode is not None and st.st_ino != inode) or st.st_dev in self._pseudo:
                    continue
                refused = self._mark_fd(path, fd, True)
                if refused is not None:
                    self._refused(path, refused)
                    continue
                with os.scandir(fd) as entries:
                    subdirs = [(os.fsencode(e.name), e.inode()) for e in entries
                               if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                self._note_dark(path, f"cannot list '{display(path)}': {exc.strerror}")
                continue
            finally:
                os.close(fd)
            stack.extend((_join(path, name), ino) for name, ino in subdirs)

    def _mark_fd(self, path: bytes, fd: int, inside: bool) -> OSError | None:
        """Mark the directory open at fd and map its handle to path; the refusal if any."""
        try:
            mark(self.fid_fd, FAN_MARK_ADD | FAN_MARK_ONLYDIR, DIR_MASK | self._extra, fd)
        except OSError as exc:
            return exc
        try:
            key = handle_key(fd)
        except OSError as exc:
            # Marked, but its events could not be mapped back to a path: take it off.
            try:
                mark(self.fid_fd, FAN_MARK_REMOVE | FAN_MARK_ONLYDIR,
                     DIR_MASK | self._extra, fd)
            except OSError:
                pass
            return exc
        known = self.dirs.get(key)
        if known is not None and known[1] and not inside:
            return None  # a root's parent that lies inside another root stays inside
        if known is not None and self._keys.get(known[0]) == key:
            del self._keys[known[0]]
        self.dirs[key] = (path, inside)
        self._keys[path] = key
        return None

    def _refused(self, path: bytes, exc: OSError) -> None:
        """A directory FID mode cannot mark: classic mode for its filesystem, or dark."""
        if exc.errno in _NO_FID_ERRORS and \
                self._watch_classic(path, f"filesystem of {display(path)} {NO_FID}"):
            return
        self._note_dark(path, _mark_error(path, exc))

    def _watch_classic(self, path: bytes, why: str) -> bool:
        """A classic-mode mark over path's filesystem; False (and a dark note) if refused.

        A filesystem mark (Linux 4.20+) rather than a mount mark: a mount mark sees only
        writes made through that very mount, and under systemd's ProtectSystem= ours is
        a read-only bind mount nobody else writes through.
        """
        if self.classic_fd < 0:
            try:
                self.classic_fd = init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK,
                                       _EVENT_F_FLAGS)
            except OSError as exc:
                self._note_dark(path, init_problem(exc))
                return False
        target = path
        while not os.path.lexists(target) and target != b"/":
            target = os.path.dirname(target)
        for kind in (FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT):
            try:
                mark(self.classic_fd, FAN_MARK_ADD | kind, CLASSIC_MASK | self._extra,
                     path=target)
                break
            except OSError as exc:
                if exc.errno != errno.EINVAL or kind == FAN_MARK_MOUNT:
                    self._note_dark(path, _mark_error(target, exc))
                    return False
        self.classic = {**self.classic, path: f"{why}: {CLASSIC_CONSEQUENCE}"}
        return True

    def _note_dark(self, path: bytes, why: str) -> None:
        if path not in self.dark:
            self.dark = {**self.dark, path: why}

    def covering_root(self, path: bytes) -> bytes | None:
        """The root path lies in (roots never nest), or None."""
        return covering_root(self.root_set, path)

    # -- events ---------------------------------------------------------------------

    def read(self, fd: int) -> bytes | None:
        """One read() of queued events; None when the queue is empty."""
        try:
            data = os.read(fd, CLASSIC_READ if fd == self.classic_fd else FID_READ)
        except BlockingIOError:
            return None
        return data or None

    def paths(self, fd: int, buf: bytes) -> Iterator[tuple[bytes | None, int]]:
        """(path, pid) of each event on the trees; (None, 0) for a queue overflow."""
        if fd == self.classic_fd:
            yield from self._classic_paths(buf)
            return
        dirs, roots = self.dirs, self.root_set
        for mask, pid, _fd, key, name in events(buf):
            if mask & FAN_Q_OVERFLOW:
                yield None, 0
                continue
            entry = dirs.get(key) if key is not None else None
            if entry is None:
                continue  # a directory no longer ours (moved away, forgotten)
            base, inside = entry
            path = base if not name or name == b"." else _join(base, name)
            if not inside and path not in roots:
                continue  # a sibling of a root, seen through the root's parent
            yield path, pid
            if mask & FAN_ONDIR and path != base:
                if mask & FAN_DELETE:
                    self._forget(path)  # rmdir: it was empty, nothing below to forget
                if mask & FAN_MOVED_FROM:
                    self._forget_tree(path)
                if mask & _GROWN:
                    self.mark_tree(path)

    def _classic_paths(self, buf: bytes) -> Iterator[tuple[bytes | None, int]]:
        batch = list(events(buf))
        try:
            for mask, pid, fd, _key, _name in batch:
                if mask & FAN_Q_OVERFLOW:
                    yield None, 0
                if fd < 0:
                    continue
                try:
                    path = os.readlink(b"/proc/self/fd/%d" % fd)
                except OSError:
                    continue
                if self.covering_root(path) is not None:
                    yield path, pid
        finally:
            for _mask, _pid, fd, _key, _name in batch:
                if fd >= 0:
                    os.close(fd)

    def _forget(self, path: bytes) -> None:
        """The directory at path went away: its mark no longer names that path."""
        key = self._keys.pop(path, None)
        if key is not None and self.dirs.get(key, (None, False))[0] == path:
            del self.dirs[key]

    def _forget_tree(self, top: bytes) -> None:
        """A directory moved: forget it and everything below (its new place, if ours,
        is walked and marked again from its FAN_MOVED_TO)."""
        for path in [p for p in self._keys if is_within(p, top)]:
            self._forget(path)

    def close(self) -> None:
        """Close the groups; the kernel drops their marks with them."""
        for fd in self.fds:
            os.close(fd)
        self.fid_fd = self.classic_fd = -1


def covering_root(roots: frozenset[bytes], path: bytes) -> bytes | None:
    """The one of `roots` (which never nest) that path lies in, or None."""
    while True:
        if path in roots:
            return path
        if path == b"/" or not path:
            return None
        path = path.rpartition(b"/")[0] or b"/"
