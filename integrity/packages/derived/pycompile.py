"""Compile Python sources to bytecode with a given interpreter, in a pool of workers.

Each worker is the interpreter a `.pyc` names (`/usr/bin/python3.11` for
`cpython-311`), started isolated (`-I -S -B`: no environment, no site, no user site,
no .pth files) and with `-X pycache_prefix` pointing at an empty private directory, so
that it never reads a `__pycache__` of the tree being judged: the only code it runs
besides its frozen bootstrap are the codec modules it needs to start, which are
checked against their package before it starts and named by the worker once it has.

The worker compiles source *bytes* sent to it, exactly as `py_compile` does
(`compile(source, dfile, "exec", dont_inherit=True, optimize=N)`, then the header of
the requested invalidation mode); it never imports or runs the source and writes
nothing. Several workers run at once; each source is compiled once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from integrity.packages.common import Verdict
from integrity.packages.derived.sandbox import Sandbox, ToolError

#: Header flags of a .pyc (PEP 552): timestamp, unchecked hash, checked hash.
TIMESTAMP, UNCHECKED_HASH, CHECKED_HASH = 0, 1, 3
_TAG = re.compile(r"^cpython-(\d)(\d+)$")
#: What an interpreter imports from files before running a -c script under -I -S with
#: LC_ALL=C (everything else it needs is built in or frozen).
_STARTUP = ("encodings/__init__.py", "encodings/aliases.py", "encodings/utf_8.py")

_WORKER = r"""
import sys, _imp
import _frozen_importlib_external as ext
rd, wr = sys.stdin.buffer, sys.stdout.buffer
mods = []
for name, mod in sorted(sys.modules.items()):
    origin = getattr(getattr(mod, "__spec__", None), "origin", None)
    if origin not in (None, "built-in", "frozen"):
        mods.append(origin)
hello = ext.MAGIC_NUMBER + "\0".join(mods).encode("utf-8", "surrogateescape")
wr.write(b"%d\n" % len(hello) + hello)
while True:
    line = rd.readline()
    if not line:
        break
    job, opt, mode, mtime, size, nd, ns = map(int, line.split())
    dfile = rd.read(nd).decode("utf-8", "surrogateescape")
    src = rd.read(ns)
    try:
        code = compile(src, dfile, "exec", dont_inherit=True, optimize=opt)
        if mode == 0:
            out = ext._code_to_timestamp_pyc(code, mtime, size)
        else:
            out = ext._code_to_hash_pyc(
                code, _imp.source_hash(ext._RAW_MAGIC_NUMBER, src), mode == 3)
        status, payload = 0, bytes(out)
    except BaseException as exc:
        status, payload = 1, repr(exc)[:300].encode("utf-8", "replace")
    wr.write(b"%d %d %d\n" % (job, status, len(payload)))
    wr.write(payload)
wr.flush()
"""


@dataclass(frozen=True)
class Job:
    """One source to compile: its bytes, the file name compiled into the code objects,
    the optimisation level, the header's mode and (timestamp mode) mtime and size."""

    source: bytes
    dfile: bytes
    optimize: int
    mode: int
    mtime: int = 0
    size: int = 0


def interpreter_for(tag: str) -> tuple[str, str] | None:
    """(interpreter path, name) for a cache tag: cpython-311 -> /usr/bin/python3.11."""
    match = _TAG.match(tag)
    if not match:
        return None
    name = f"python{match.group(1)}.{match.group(2)}"
    return f"/usr/bin/{name}", name


def timestamp_of(mtime_ns: int) -> int:
    """The 32-bit source mtime py_compile writes: int() of os.stat's float st_mtime."""
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    return int(sec + nsec * 1e-9) & 0xFFFFFFFF


class Compiler:
    """Compiles batches of jobs with one interpreter; results are bytes or a reason."""

    def __init__(self, interpreter: str, sandbox: Sandbox,
                 vouch: Callable[[bytes], Verdict], workers: int | None = None) -> None:
        self.interpreter = interpreter
        self.name = os.path.basename(interpreter)
        self._sandbox = sandbox
        self._vouch = vouch
        self._workers = workers or max(1, os.cpu_count() or 1)
        self.magic: bytes | None = None

    def _startup_files(self, real: str) -> list[bytes]:
        """The stdlib files the interpreter runs at start (checked before it does)."""
        stdlib = os.path.join(os.path.dirname(os.path.dirname(real)), "lib", self.name)
        zipped = stdlib.replace(".", "") + ".zip"  # python311.zip would be searched first
        if os.path.lexists(zipped):
            raise ToolError(f"{zipped} exists: {self.name} would load its startup code "
                            "from it")
        return [os.fsencode(os.path.join(stdlib, name)) for name in _STARTUP]

    def _command(self) -> tuple[list[str], str]:
        real = self._sandbox.tool(self.interpreter)
        for path in self._startup_files(real):
            verdict = self._vouch(path)
            if not verdict.vouched:
                raise ToolError(f"will not start {self.name}: its startup module "
                                f"{os.fsdecode(path)} is not vouched for: {verdict.reason}")
        prefix = self._sandbox.tempdir("pycache-")
        return [real, "-I", "-S", "-B", "-X", "frozen_modules=on", "-X",
                f"pycache_prefix={prefix}", "-c", _WORKER], prefix

    def compile(self, jobs: Sequence[Job]) -> list[bytes | str]:
        """Bytecode (or why not) for each job, in order. Raises ToolError when the
        interpreter cannot be used at all."""
        if not jobs:
            return []
        argv, cwd = self._command()
        count = min(self._workers, max(1, len(jobs) // 64 + 1))
        shares = [list(range(i, len(jobs), count)) for i in range(count)]
        results: list[bytes | str] = ["not compiled"] * len(jobs)
        with ThreadPoolExecutor(count) as pool:
            outputs = list(pool.map(lambda share: self._run(argv, cwd, jobs, share), shares))
        for share, answers in zip(shares, outputs):
            for index in share:
                results[index] = answers.get(index, "the compiler gave no answer")
        return results

    def _run(self, argv: list[str], cwd: str, jobs: Sequence[Job],
             share: list[int]) -> dict[int, bytes | str]:
        parts = []
        for index in share:
            job = jobs[index]
            parts.append(b"%d %d %d %d %d %d %d\n" % (
                index, job.optimize, job.mode, job.mtime, job.size, len(job.dfile),
                len(job.source)))
            parts += [job.dfile, job.source]
        out = self._sandbox.run(argv, cwd=cwd, stdin=b"".join(parts))
        return self._parse(out)

    def _parse(self, out: bytes) -> dict[int, bytes | str]:
        head, _, rest = out.partition(b"\n")
        if not head.isdigit():
            raise ToolError(f"{self.name} did not start as a compiler")
        hello, rest = rest[:int(head)], rest[int(head):]
        magic, loaded = hello[:4], [m for m in hello[4:].split(b"\0") if m]
        for origin in loaded:
            verdict = self._vouch(origin)
            if not verdict.vouched:
                raise ToolError(f"{self.name} loaded {os.fsdecode(origin)} at start, which "
                                f"is not vouched for: {verdict.reason}")
        self.magic = magic
        answers: dict[int, bytes | str] = {}
        while rest:
            line, _, rest = rest.partition(b"\n")
            job, status, length = map(int, line.split())
            payload, rest = rest[:length], rest[length:]
            answers[job] = payload if status == 0 else \
                f"{self.name} cannot compile it: {payload.decode(errors='replace')}"
        return answers
