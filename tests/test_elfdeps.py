"""The ELF closure of real system programs, parsed in Python, and the tool pin over it.

ldd appears here only as the oracle the parser is checked against: the code never
runs it (nor ld.so) to find libraries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from integrity.packages import elfdeps
from integrity.packages.elfdeps import ElfError, closure, parse, read_cache
from integrity.packages.pinned import ENV, PinnedTools, ToolRefused

GPGV = "/usr/bin/gpgv"  # scripts/test installs it


def _ldd(path: str) -> set[str]:
    """Real paths of what ldd says `path` loads (the vDSO has no file)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        words = line.split()
        target = words[2] if "=>" in words and len(words) > 2 else words[0]
        if target.startswith("/"):
            found.add(os.path.realpath(target))
    return found


def test_parse_reads_the_interpreter_and_needed_libraries_of_gpgv() -> None:
    elf = parse(Path(GPGV).read_bytes(), GPGV)
    assert elf.bits in (32, 64)
    assert elf.interp is not None and os.path.exists(elf.interp)
    assert "libgcrypt.so.20" in elf.needed and "libc.so.6" in elf.needed
    assert elf.rpath == elf.runpath == ()


def test_closure_of_gpgv_holds_libgcrypt_and_the_interpreter() -> None:
    found = closure(GPGV)
    assert found[0] == os.path.realpath(GPGV)
    interp = parse(Path(GPGV).read_bytes()).interp
    assert interp is not None and os.path.realpath(interp) in found
    assert any("/libgcrypt.so.20" in p for p in found), found
    assert any("/libgpg-error.so.0" in p for p in found), found  # libgcrypt's own
    assert all(p == os.path.realpath(p) for p in found) and len(set(found)) == len(found)


@pytest.mark.parametrize("program", [GPGV, "/usr/bin/dpkg-deb", "/usr/lib/apt/apt-helper",
                                     "/usr/bin/python3"])
def test_closure_agrees_with_ldd(program: str) -> None:
    assert set(closure(program)) == _ldd(program) | {os.path.realpath(program)}


def test_each_file_is_visited_once_with_the_bytes_parsed() -> None:
    seen: list[str] = []

    def visit(path: str, data: bytes) -> None:
        assert data == Path(path).read_bytes()
        seen.append(path)

    assert closure(GPGV, visit) == seen
    assert len(seen) == len(set(seen))


def test_a_visit_that_refuses_stops_the_walk_before_the_file_is_parsed(
        tmp_path: Path) -> None:
    script = tmp_path / "gpgv"
    script.write_bytes(b"#!/bin/sh\necho '[GNUPG:] GOODSIG'\n")

    def refuse(path: str, data: bytes) -> None:
        raise ToolRefused(f"{path} refused")

    with pytest.raises(ToolRefused, match="gpgv refused"):
        closure(str(script), refuse)
    with pytest.raises(ElfError, match="is not an ELF file"):
        closure(str(script))


def test_the_loader_cache_names_the_libraries() -> None:
    cache = read_cache()
    assert cache, "/etc/ld.so.cache could not be read"
    assert any(os.path.realpath(p) == os.path.realpath(q) for p in cache["libc.so.6"]
               for q in closure(GPGV))


def test_hwcap_subdirectories_are_candidates_too(tmp_path: Path) -> None:
    """ld.so prefers a glibc-hwcaps (or, before glibc 2.37, a legacy hwcap) build of a
    library: one planted there is a candidate the pin must judge."""
    for sub in ("glibc-hwcaps/x86-64-v3", "haswell/x86_64", "unrelated"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "libx.so.1").write_bytes(b"")
    (tmp_path / "libx.so.1").write_bytes(b"")
    assert elfdeps._in_dir(str(tmp_path), "libx.so.1") == sorted(
        [str(tmp_path / "glibc-hwcaps/x86-64-v3/libx.so.1"),
         str(tmp_path / "haswell/x86_64/libx.so.1")]
    ) + [str(tmp_path / "libx.so.1")]


def test_platform_in_a_search_path_is_refused() -> None:
    with pytest.raises(ElfError, match=r"\$PLATFORM"):
        elfdeps._expand("/opt/$PLATFORM/lib", "/opt/bin", "/opt/bin/tool")
    assert elfdeps._expand("$ORIGIN/../lib", "/opt/bin", "x") == ["/opt/bin/../lib"]


def _recorded(paths: list[str], other: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return {p: hashlib.sha256((other or {}).get(p) or Path(p).read_bytes()).digest()
            for p in paths}


def test_pinned_tools_check_each_file_once_per_instance(tmp_path: Path) -> None:
    files = closure(GPGV)
    recorded = _recorded(files)
    asked: list[str] = []

    def check(path: str, data: bytes) -> str | None:
        asked.append(path)
        if path not in recorded:
            return "not in the integrity baseline (protect it with a rule)"
        return None if hashlib.sha256(data).digest() == recorded[path] else \
            "differs from the integrity baseline"

    tools = PinnedTools(check, preload=str(tmp_path / "absent"))
    assert tools.resolve(GPGV) == os.path.realpath(GPGV)
    assert tools.resolve(GPGV) == os.path.realpath(GPGV)
    assert sorted(asked) == sorted(files)
    # The interpreter missing from the baseline: refused, naming it.
    interp = files[1]
    del recorded[interp]
    with pytest.raises(ToolRefused, match=f"{interp} \\(loaded by /usr/bin/gpgv\\) not in "
                                          "the integrity baseline"):
        PinnedTools(check, preload=str(tmp_path / "absent")).resolve(GPGV)
    with pytest.raises(ToolRefused, match="not checked against a baseline"):
        PinnedTools(None).resolve(GPGV)


def test_pinned_tools_run_with_a_fixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PATH", "/tmp/evil:/usr/bin")
    env = PinnedTools.env(GNUPGHOME="/x")
    assert env == {**ENV, "GNUPGHOME": "/x"}
    assert not any(key.startswith("LD_") for key in env)


def _old_cache(entries: dict[str, str]) -> bytes:
    """An ld.so.cache in glibc's old format only ("ld.so-1.7.0"; strings after the
    table), which ld.so still reads when no new-format table follows."""
    strings, table = b"", b""
    for name, path in sorted(entries.items()):
        key = len(strings)
        strings += name.encode() + b"\0"
        value = len(strings)
        strings += path.encode() + b"\0"
        table += struct.pack("=iII", 0x0303, key, value)  # FLAG_ELF_LIBC6 | x86-64
    return b"ld.so-1.7.0\0" + struct.pack("=I", len(entries)) + table + strings


def _planted(where: Path) -> Path:
    """A copy of gpgv's libgpg-error at `where` (a library an intruder plants)."""
    real = next(p for p in closure(GPGV) if "/libgpg-error.so.0" in p)
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(real, where)
    return where


def test_an_old_format_cache_is_read_as_ld_so_reads_it(tmp_path: Path) -> None:
    """ld.so (glibc 2.36 checked, with the cache bind-mounted in a private mount
    namespace) loads what an old-format-only cache names; reading only the new format
    found nothing, so the closure took the default directory's library instead."""
    planted = _planted(tmp_path / "evil" / "libgpg-error.so.0")
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(_old_cache({"libgpg-error.so.0": str(planted)}))
    assert read_cache(str(cache)) == {"libgpg-error.so.0": [str(planted)]}
    assert str(planted) in closure(GPGV, cache=read_cache(str(cache)))


def test_a_cache_entry_does_not_end_the_search(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ld.so skips a cache entry whose flags (x32's 0x0803 on x86-64, checked) or
    hwcaps do not suit the host and searches the default directories, their
    glibc-hwcaps subdirectories first: a library planted there is loaded although the
    cache names the recorded one. It must be judged too."""
    planted = _planted(tmp_path / "glibc-hwcaps" / "x86-64-v2" / "libgpg-error.so.0")
    real_defaults = elfdeps.default_dirs
    monkeypatch.setattr(elfdeps, "default_dirs",
                        lambda elf: [str(tmp_path), *real_defaults(elf)])
    assert str(planted) in closure(GPGV, cache=read_cache())


def test_a_truncated_cache_reads_as_empty(tmp_path: Path) -> None:
    cache = tmp_path / "ld.so.cache"
    for data in (b"ld.so-1.7.0", b"ld.so-1.7.0\0\xff\xff\xff\xff",
                 b"glibc-ld.so.cache1.1" + b"\xff" * 28):
        cache.write_bytes(data)
        assert read_cache(str(cache)) == {}


def test_a_fifo_or_device_as_a_library_is_refused_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO named like a library blocked the walk forever (open waits for a
    writer), /dev/zero through a symlink was read without end."""
    os.mkfifo(tmp_path / "libgpg-error.so.0")
    (tmp_path / "glibc-hwcaps" / "x86-64-v2").mkdir(parents=True)
    os.symlink("/dev/zero", tmp_path / "glibc-hwcaps" / "x86-64-v2" / "libz.so.1")
    real_defaults = elfdeps.default_dirs
    monkeypatch.setattr(elfdeps, "default_dirs",
                        lambda elf: [str(tmp_path), *real_defaults(elf)])
    for soname in ("libgpg-error.so.0", "libz.so.1"):
        cache = {k: v for k, v in read_cache().items() if k != soname}
        outcome: list[BaseException | None] = []

        def walk(cache: dict[str, list[str]] = cache) -> None:
            try:
                closure(GPGV, cache=cache)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)

        thread = threading.Thread(target=walk, daemon=True)
        thread.start()
        thread.join(20)
        assert outcome, f"the walk did not end with {soname} a FIFO or device"
        assert isinstance(outcome[0], ElfError) and "not a regular file" in str(outcome[0])


def test_a_binfmt_misc_entry_claiming_the_tool_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel asks binfmt_misc before its ELF loader: an entry whose magic matches
    gpgv's ELF header runs the intruder's interpreter in gpgv's place, every file of
    gpgv's closure still as the baseline recorded it."""
    from integrity.packages import pinned

    files = closure(GPGV)
    recorded = _recorded(files)

    def check(path: str, data: bytes) -> str | None:
        return None if hashlib.sha256(data).digest() == recorded.get(path) else "differs"

    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    (binfmt / "status").write_text("enabled\n")
    (binfmt / "register").write_text("")
    head = Path(GPGV).read_bytes()[:20]
    other = head[:18] + b"\xb7\x00"  # aarch64: not gpgv's machine
    (binfmt / "qemu-aarch64").write_text(
        f"enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: F\noffset 0\n"
        f"magic {other.hex()}\nmask {'ff' * 20}\n")
    (binfmt / "off").write_text(f"disabled\ninterpreter /tmp/evil\nflags: \noffset 0\n"
                                f"magic {head.hex()}\n")
    monkeypatch.setattr(pinned, "BINFMT_MISC", str(binfmt), raising=False)
    absent = str(tmp_path / "absent")
    assert PinnedTools(check, preload=absent).resolve(GPGV) == os.path.realpath(GPGV)
    (binfmt / "elf").write_text(
        f"enabled\ninterpreter /tmp/evil\nflags: F\noffset 0\nmagic {head[:8].hex()}\n"
        f"mask ffffffffffff00ff\n")
    with pytest.raises(ToolRefused, match="binfmt_misc entry .*elf would run /tmp/evil"):
        PinnedTools(check, preload=absent).resolve(GPGV)
    (binfmt / "status").write_text("disabled\n")
    assert PinnedTools(check, preload=absent).resolve(GPGV) == os.path.realpath(GPGV)
