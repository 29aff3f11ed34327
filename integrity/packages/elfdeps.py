"""Which files the dynamic loader would map into a program: its ELF closure, read here.

`closure` parses the program's ELF headers itself (nothing is run: not ldd, not ld.so)
and follows PT_INTERP (the loader) and every DT_NEEDED entry, recursively, to the files
glibc's ld.so would open for them, given the environment we run tools with (no
LD_LIBRARY_PATH, no LD_PRELOAD) and an empty /etc/ld.so.preload (checked by the
caller). Where ld.so could pick one of several files, every one of them is returned,
so a caller that judges each file judges whichever is loaded:

- a name with a slash is that path;
- otherwise DT_RPATH (of the object and the objects that loaded it, when the object has
  no DT_RUNPATH) and DT_RUNPATH directories, in order, stopping at the first directory
  that holds the name (its glibc-hwcaps and legacy hwcap subdirectories included);
- else every entry /etc/ld.so.cache holds for the name, in either of its formats and
  whatever its flags (the cache is what ld.so reads: /etc/ld.so.conf and its drop-ins
  only feed ldconfig, which writes the cache);
- and, since ld.so goes on past a cache entry whose flags or hwcaps it rejects (and
  the cache is a root-writable file), always the default directories too (the
  multiarch directories, /lib, /usr/lib, and /lib64, /usr/lib64 for 64-bit objects),
  first directory that holds the name.

A candidate that is not a regular file (a FIFO, a device) or is larger than any
library is refused, not read.

A candidate whose ELF class or machine differs from the loading object's is skipped,
as ld.so skips it.

Limits: libraries a program loads itself with dlopen (NSS modules, gconv charset
modules, plugins) are not found, nor anything a program executes; $PLATFORM in a
search path cannot be resolved here (refused); the files are judged as they are at
the time of reading, so an intruder racing between the check and the run (swapping a
file or a symlink on the way to it) is not caught.
"""

from __future__ import annotations

import glob
import os
import stat
import struct
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass

CACHE = "/etc/ld.so.cache"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 15, 29
#: e_machine -> the multiarch triplet Debian names its library directories by.
_TRIPLETS = {(62, 2): "x86_64-linux-gnu", (3, 1): "i386-linux-gnu",
             (183, 2): "aarch64-linux-gnu", (40, 1): "arm-linux-gnueabihf",
             (21, 2): "powerpc64le-linux-gnu", (22, 2): "s390x-linux-gnu",
             (243, 2): "riscv64-linux-gnu", (8, 2): "mips64el-linux-gnuabi64"}
#: Subdirectory names glibc before 2.37 searched for hwcap-specific builds.
_LEGACY_HWCAPS = {"tls", "x86_64", "haswell", "xeon_phi", "avx512_1", "i386", "i486",
                  "i586", "i686", "sse2", "aarch64", "asimd", "v7l", "neon", "vfp",
                  "power8", "power9", "power10", "z13", "z14", "z15"}
_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
_OLD_CACHE_MAGIC = b"ld.so-1.7.0"
#: Larger than any real cache or library: not read (a sparse file could be huge).
_MAX_CACHE = 64 << 20
_MAX_OBJECT = 1 << 30


class ElfError(Exception):
    """A file is not an ELF object we can follow, or a library cannot be found."""


@dataclass(frozen=True)
class Elf:
    """What the loader reads of one ELF file."""

    bits: int                  # 32 or 64
    machine: int               # e_machine
    interp: str | None         # PT_INTERP
    needed: tuple[str, ...]    # DT_NEEDED, in order
    rpath: tuple[str, ...]     # DT_RPATH directories, unexpanded
    runpath: tuple[str, ...]   # DT_RUNPATH directories, unexpanded


def parse(data: bytes, name: str = "file") -> Elf:
    """The loader-relevant headers of an ELF file's bytes; ElfError if it is none."""
    if data[:4] != b"\x7fELF" or len(data) < 52:
        raise ElfError(f"{name} is not an ELF file")
    bits = {1: 32, 2: 64}.get(data[4])
    end = {1: "<", 2: ">"}.get(data[5])
    if bits is None or end is None:
        raise ElfError(f"{name}: unknown ELF class or byte order")
    ehdr = end + ("16sHHIQQQIHHH" if bits == 64 else "16sHHIIIIIHHH")
    phdr, dyn = (end + "IIQQQQQQ", end + "qQ") if bits == 64 else (end + "IIIIIIII", end + "iI")
    try:
        _, _, machine, _, _, phoff, _, _, _, phentsize, phnum = struct.unpack_from(ehdr, data)
        segments = []
        for i in range(phnum):
            fields = struct.unpack_from(phdr, data, phoff + i * phentsize)
            if bits == 64:
                p_type, _, offset, vaddr, _, filesz, _, _ = fields
            else:
                p_type, offset, vaddr, _, filesz, _, _, _ = fields
            segments.append((p_type, offset, vaddr, filesz))
        interp = None
        entries: list[tuple[int, int]] = []
        for p_type, offset, _, filesz in segments:
            if p_type == _PT_INTERP:
                interp = data[offset:offset + filesz].split(b"\0", 1)[0].decode()
            elif p_type == _PT_DYNAMIC:
                size = struct.calcsize(dyn)
                for at in range(offset, offset + filesz - size + 1, size):
                    tag, value = struct.unpack_from(dyn, data, at)
                    if tag == _DT_NULL:
                        break
                    entries.append((tag, value))
        strtab = next((v for t, v in entries if t == _DT_STRTAB), None)
        strings: dict[int, list[str]] = {}
        if strtab is not None:
            # DT_STRTAB is an address: the PT_LOAD segment holding it says where it is.
            base = next((off + strtab - vaddr for t, off, vaddr, size in segments
                         if t == _PT_LOAD and vaddr <= strtab < vaddr + size), None)
            if base is None:
                raise ElfError(f"{name}: its string table is outside every segment")
            for tag, value in entries:
                if tag in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
                    text = data[base + value:].split(b"\0", 1)[0].decode(
                        "utf-8", "surrogateescape")
                    strings.setdefault(tag, []).append(text)
        elif any(t == _DT_NEEDED for t, _ in entries):
            raise ElfError(f"{name}: DT_NEEDED without a string table")
    except (struct.error, UnicodeDecodeError) as exc:
        raise ElfError(f"{name}: corrupt ELF headers ({exc})") from None

    def dirs(tag: int) -> tuple[str, ...]:
        return tuple(d for s in strings.get(tag, []) for d in s.split(":") if d)

    return Elf(bits, machine, interp, tuple(strings.get(_DT_NEEDED, [])), dirs(_DT_RPATH),
               dirs(_DT_RUNPATH))


def _ident(data: bytes) -> tuple[int, int] | None:
    """(bits, machine) from an ELF header, or None when it is not one."""
    if data[:4] != b"\x7fELF" or len(data) < 20 or data[4] not in (1, 2) \
            or data[5] not in (1, 2):
        return None
    (machine,) = struct.unpack_from("<H" if data[5] == 1 else ">H", data, 18)
    return 32 * data[4], machine


def default_dirs(elf: Elf) -> list[str]:
    """The directories ld.so searches last for an object of this class and machine."""
    triplet = _TRIPLETS.get((elf.machine, elf.bits // 32)) or \
        sysconfig.get_config_var("MULTIARCH")
    dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
    dirs += ["/lib", "/usr/lib"]
    return dirs + (["/lib64", "/usr/lib64"] if elf.bits == 64 else [])


def read_cache(path: str = CACHE) -> dict[str, list[str]]:
    """soname -> every path /etc/ld.so.cache gives for it (empty when unreadable).

    The cache is root-writable and ld.so reads either format (the old "ld.so-1.7.0"
    table when no new one follows it), and skips entries by flags and hwcaps: every
    entry of both formats is returned, whatever its flags, so that whichever ld.so
    takes is among them. ElfError when the file is not a regular one or too large to
    read (ld.so would map it whole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_CACHE:
            raise ElfError(f"{path} is not a regular file of at most {_MAX_CACHE} bytes")
        try:
            data = handle.read()
        except OSError:
            return {}
    found: dict[str, list[str]] = {}

    def table(first: int, count: int, size: int, strings: int) -> None:
        count = min(count, max(0, (len(data) - first) // size))
        for i in range(count):
            _, key, value = struct.unpack_from("=iII", data, first + i * size)
            found.setdefault(_string(data, strings + key), []).append(
                _string(data, strings + value))

    new = 0
    if data.startswith(_OLD_CACHE_MAGIC) and len(data) >= 16:
        (count,) = struct.unpack_from("=I", data, 12)
        # Old-format string offsets count from the end of its table.
        table(16, count, 12, 16 + count * 12)
        new = (16 + count * 12 + 7) & ~7
    if data[new:new + len(_CACHE_MAGIC)] == _CACHE_MAGIC and len(data) >= new + 48:
        (count,) = struct.unpack_from("=I", data, new + 20)
        # New-format string offsets count from the start of the new header.
        table(new + 48, count, 24, new)
    return found


def _string(data: bytes, at: int) -> str:
    """The NUL-terminated string at `at` ("" outside the data), without copying the
    rest of the data."""
    if not 0 <= at < len(data):
        return ""
    end = data.find(b"\0", at)
    return data[at:end if end >= 0 else len(data)].decode("utf-8", "surrogateescape")


def _in_dir(directory: str, soname: str) -> list[str]:
    """The files named soname that ld.so may take from one directory: its hwcap
    subdirectories' first, then its own."""
    found = glob.glob(os.path.join(glob.escape(directory), "glibc-hwcaps", "*",
                                   glob.escape(soname)))
    stack = [(directory, 0)]
    while stack:
        base, depth = stack.pop()
        if depth == 3:
            continue
        try:
            names = [n for n in os.listdir(base) if n in _LEGACY_HWCAPS]
        except OSError:
            continue
        for sub in names:
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                if os.path.lexists(os.path.join(path, soname)):
                    found.append(os.path.join(path, soname))
                stack.append((path, depth + 1))
    own = os.path.join(directory, soname)
    return sorted(found) + ([own] if os.path.lexists(own) else [])


def _expand(directory: str, origin: str, name: str) -> list[str]:
    """A DT_RPATH/DT_RUNPATH entry with its dynamic string tokens replaced."""
    if "$PLATFORM" in directory or "${PLATFORM}" in directory:
        raise ElfError(f"{name} searches a $PLATFORM directory ({directory}): where it "
                       "loads libraries from cannot be told")
    directory = directory.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
    if "$LIB" in directory or "${LIB}" in directory:
        return [directory.replace("${LIB}", lib).replace("$LIB", lib)
                for lib in ("lib", "lib64", *(f"lib/{t}" for t in _TRIPLETS.values()))]
    return [directory]


@dataclass
class _Loaded:
    path: str           # as the loader finds it (what $ORIGIN is relative to)
    elf: Elf
    rpaths: list[str]   # DT_RPATH directories it passes on to what it loads


def closure(executable: str, visit: Callable[[str, bytes], None] | None = None,
            cache: dict[str, list[str]] | None = None) -> list[str]:
    """The real paths of `executable`, its ELF interpreter and every shared library
    ld.so could load for it (see the module's docstring), executable first.

    Each file is read once, and `visit(real path, bytes)` sees those bytes before
    they are parsed (a visit that raises stops the walk). ElfError when a file is not
    ELF, a library is found nowhere, or a file cannot be read. `cache` is
    /etc/ld.so.cache as `read_cache` gives it (read here when None).
    """
    cache = read_cache() if cache is None else cache
    order: list[str] = []
    parsed: dict[str, Elf | None] = {}

    def load(path: str, want: Elf | None) -> Elf | None:
        """The file's headers, or None when ld.so would skip it (another machine)."""
        real = os.path.realpath(path)
        if real in parsed:
            return parsed[real]
        try:
            # Not blocking on a FIFO, nor reading a device or a huge sparse file: a
            # candidate is any name an intruder can plant in a searched directory.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_OBJECT:
                    raise ElfError(f"{real} is not a regular file of at most "
                                   f"{_MAX_OBJECT} bytes")
                data = handle.read(64)
                if want is not None and _ident(data) != (want.bits, want.machine):
                    parsed[real] = None
                    return None
                data += handle.read(_MAX_OBJECT)
        except OSError as exc:
            raise ElfError(f"cannot read {real}: {exc.strerror}") from None
        if visit is not None:
            visit(real, data)  # judged before anything of it is believed
        elf = parse(data, real)
        parsed[real] = elf
        order.append(real)
        return elf

    main = load(executable, None)
    assert main is not None
    if main.interp is not None:
        if load(main.interp, main) is None:
            raise ElfError(f"{executable}: its interpreter {main.interp} is of another "
                           "machine")
    top = _Loaded(os.path.realpath(executable), main, [])
    top.rpaths = [] if main.runpath else _dirs(main.rpath, top.path, executable)
    queue, queued = [top], {top.path}
    while queue:
        loader = queue.pop(0)
        for soname in loader.elf.needed:
            found = False
            # Directory by directory, as ld.so searches: the first that holds a file
            # of the loader's machine ends the search (all its candidates count).
            for group, final in _candidates(soname, loader, cache):
                for path in group:
                    elf = load(path, loader.elf)
                    if elf is None:
                        continue
                    found = True
                    real = os.path.realpath(path)
                    if real not in queued:
                        queued.add(real)
                        own = [] if elf.runpath else _dirs(elf.rpath, path, path)
                        queue.append(_Loaded(path, elf, own + loader.rpaths))
                if found and final:
                    break
            if not found:
                raise ElfError(f"{loader.path} needs {soname}, which is found nowhere "
                               "ld.so looks")
    return order


def _dirs(entries: tuple[str, ...], path: str, name: str) -> list[str]:
    origin = os.path.dirname(path)
    return [d for entry in entries for d in _expand(entry, origin, name)]


def _candidates(soname: str, loader: _Loaded,
                cache: dict[str, list[str]]) -> list[tuple[list[str], bool]]:
    """The files ld.so could load for one DT_NEEDED entry of `loader`, as groups in
    the order it searches them (a group: one directory's, or the cache's), each with
    whether finding the name there ends the search.

    The cache's group never does: ld.so takes an entry only if its flags and hwcaps
    suit the host, else it goes on to the default directories, and the cache is a
    root-writable file. So the first default directory holding the name is judged
    too, whatever the cache says."""
    if "/" in soname:
        if not soname.startswith("/"):
            raise ElfError(f"{loader.path} needs {soname}, a path relative to the "
                           "working directory")
        return [([soname], True)]
    searched = [] if loader.elf.runpath else list(loader.rpaths)
    searched += _dirs(loader.elf.runpath, loader.path, loader.path)
    groups = [(_in_dir(d, soname), True) for d in searched]
    groups.append(([p for p in cache.get(soname, []) if os.path.lexists(p)], False))
    groups += [(_in_dir(d, soname), True) for d in default_dirs(loader.elf)]
    return [(g, final) for g, final in groups if g]
