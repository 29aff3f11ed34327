"""fanotify(7): the ctypes binding (constants, init, mark, handles, event parsing).

The marks over the protected trees are marks.py's business, what a pid means (the
process behind it) processes.py's; byte offsets are this module's. Layouts follow the
kernel's uapi header (include/uapi/linux/fanotify.h): `struct fanotify_event_metadata`
is 24 bytes with the 64-bit mask naturally aligned at offset 8; each info record starts
with a 4-byte header (info_type u8, pad u8, len u16), and a file-id record continues
with the filesystem id (2 x s32) and a `struct file_handle` (handle_bytes u32,
handle_type s32, f_handle[]), followed, in a DFID_NAME record, by the NUL-terminated
entry name.

Only the standard library is imported: the helper process starts with `python -S`,
and an unprivileged probe runs this under Debian's /usr/bin/python3, neither of which
can be assumed to see the project's dependencies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator

from integrity.realtime.procfs import read_small

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
        self._lib: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL:
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


NOT_ROOT = ("fanotify unavailable: not running as root (the kernel tells the writers' "
            "process ids only to a listener with CAP_SYS_ADMIN)")
_CAP_SYS_ADMIN = 21


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


def privilege_problem() -> str | None:
    """Why this process cannot learn writers' pids, or None (it has CAP_SYS_ADMIN).

    Since Linux 5.13 an unprivileged fanotify_init() succeeds, but the kernel then
    reports pid 0 for every other process's events: useless here, so we check first.
    """
    try:
        status = read_small(b"/proc/self/status", 16384)
    except OSError:
        return None if os.geteuid() == 0 else NOT_ROOT
    for line in status.splitlines():
        if line.startswith(b"CapEff:"):
            return None if int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1 else NOT_ROOT
    return None if os.geteuid() == 0 else NOT_ROOT
