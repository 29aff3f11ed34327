"""Python bytecode: a `.pyc` is vouched for when compiling its vouched source again
gives exactly its bytes.

`__pycache__/NAME.cpython-311[.opt-N].pyc` is compiled from `NAME.py` beside the
`__pycache__` directory, by the interpreter its tag names (python3.11), at the
optimisation level its name gives, in the invalidation mode its header states (the
source's mtime and size in a timestamp header are the source's own). The source must
be what its package shipped, judged on the very bytes that are compiled; the
interpreter's magic number must be the header's. Anything else (a planted payload
behind a valid header, a .pyc whose source is not a package's, an unknown tag) stays
open with the reason. A `__pycache__` directory passes when the directory it sits in
is a package's; removing bytecode passes once its source is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from integrity.packages.common import Verdict
from integrity.packages.derived.common import (UMASK, Change, Context, content_is,
                                               evidence, not_vouched, shape_problem)
from integrity.packages.derived.pycompile import (CHECKED_HASH, TIMESTAMP, UNCHECKED_HASH,
                                                  Compiler, Job, interpreter_for,
                                                  timestamp_of)
from integrity.packages.derived.sandbox import ToolError
from integrity.paths import display

NAME = "python-bytecode"
_CACHE_DIR = b"__pycache__"
_HEADER = 16


@dataclass(frozen=True)
class _Pyc:
    """What a .pyc's name says: its source, interpreter tag and optimisation level."""

    source: bytes
    tag: str
    optimize: int


def parse_name(path: bytes) -> _Pyc | None:
    """DIR/__pycache__/NAME.TAG[.opt-N].pyc -> (DIR/NAME.py, TAG, N); None otherwise."""
    directory, base = os.path.split(path)
    if os.path.basename(directory) != _CACHE_DIR or not base.endswith(b".pyc"):
        return None
    parts = base[:-4].split(b".")
    optimize = 0
    if len(parts) >= 3 and parts[-1] in (b"opt-1", b"opt-2"):
        optimize = int(parts.pop()[4:])
    if len(parts) < 2 or not parts[0]:
        return None
    tag = parts.pop().decode("ascii", "replace")
    source = os.path.join(os.path.dirname(directory), b".".join(parts) + b".py")
    return _Pyc(source, tag, optimize)


class Bytecode:
    """The python-bytecode kind."""

    name = NAME

    def claims(self, change: Change) -> bool:
        base = os.path.basename(change.path)
        return base == _CACHE_DIR or (base.endswith(b".pyc") and os.path.basename(
            os.path.dirname(change.path)) == _CACHE_DIR)

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        verdicts: dict[bytes, Verdict] = {}
        planned: dict[str, list[tuple[Change, Job, bytes]]] = {}
        for change in changes:
            if os.path.basename(change.path) == _CACHE_DIR:
                verdicts[change.path] = self._directory(change, ctx)
                continue
            outcome = self._plan(change, ctx)
            if isinstance(outcome, Verdict):
                verdicts[change.path] = outcome
            else:
                interpreter, job, magic = outcome
                planned.setdefault(interpreter, []).append((change, job, magic))
        for interpreter, items in planned.items():
            compiler = Compiler(interpreter, ctx.sandbox, ctx.vouched)
            try:
                results = compiler.compile([job for _, job, _ in items])
            except ToolError as exc:
                for change, *_ in items:
                    verdicts[change.path] = Verdict(False, f"cannot compile it again: {exc}")
                continue
            for (change, job, magic), result in zip(items, results):
                verdicts[change.path] = self._compare(change, job, magic, result, compiler)
        return verdicts

    def _directory(self, change: Change, ctx: Context) -> Verdict:
        if change.new is None:
            return Verdict(True, "a bytecode cache directory: removing it removes no code",
                           evidence(NAME))
        parent = os.path.dirname(change.path)
        verdict = ctx.vouched(parent)
        if not verdict.vouched:
            return not_vouched("the directory it caches bytecode for,", parent, verdict)
        problem = shape_problem(change, "dir", 0o777 & ~UMASK, "py3compile")
        if problem:
            return Verdict(False, problem)
        return Verdict(True, f"the bytecode cache of {display(parent)} ({verdict.reason})",
                       evidence(NAME), verdict.package)

    def _plan(self, change: Change, ctx: Context) -> Verdict | tuple[str, Job, bytes]:
        """The compile job for a .pyc, or the verdict when none is needed or possible."""
        pyc = parse_name(change.path)
        if pyc is None:
            return Verdict(False, "not a bytecode file name (NAME.TAG[.opt-N].pyc)")
        found = interpreter_for(pyc.tag)
        if found is None:
            return Verdict(False, f"no interpreter is known for the cache tag {pyc.tag!r}")
        interpreter, name = found
        if change.new is None:
            if not os.path.lexists(pyc.source):
                return Verdict(True, f"its source {display(pyc.source)} is gone",
                               evidence(NAME))
            if not os.path.lexists(interpreter):
                return Verdict(True, f"{name} is no longer installed", evidence(NAME))
            return Verdict(False, f"removed while its source {display(pyc.source)} and "
                           f"{name} are still there")
        batch = ctx.changes.get(pyc.source)
        if batch is not None and not batch.verdict.vouched:
            return not_vouched("its source", pyc.source, batch.verdict)
        source, verdict = ctx.vouched_read(pyc.source)
        if source is None:
            return not_vouched("its source", pyc.source, verdict)
        mode = (source.lstat().st_mode | 0o200) & 0o666 & ~UMASK
        problem = shape_problem(change, "file", mode, name)
        if problem:
            return Verdict(False, problem)
        try:
            fd = os.open(change.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
            try:
                header = os.pread(fd, _HEADER, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            return Verdict(False, f"cannot read its header: {exc.strerror}")
        flags = int.from_bytes(header[4:8], "little") if len(header) == _HEADER else -1
        if flags not in (TIMESTAMP, UNCHECKED_HASH, CHECKED_HASH):
            return Verdict(False, "not a bytecode file: its header is not one that "
                           f"{name} writes")
        st = source.lstat()
        job = Job(source.data, pyc.source, pyc.optimize, flags,
                  timestamp_of(st.st_mtime_ns), st.st_size & 0xFFFFFFFF)
        return interpreter, job, header[:4]

    def _compare(self, change: Change, job: Job, magic: bytes, result: bytes | str,
                 compiler: Compiler) -> Verdict:
        name = compiler.name
        if isinstance(result, str):
            return Verdict(False, result)
        if magic != compiler.magic:
            return Verdict(False, f"its magic number {magic.hex()} is not {name}'s "
                           f"({(compiler.magic or b'').hex()})")
        source = display(job.dfile)
        if content_is(change, result):
            return Verdict(True, f"compiled again from {source} by {name}: identical",
                           evidence(NAME))
        return Verdict(False, f"differs from what {name} compiles from {source} (which "
                       "matches its package): planted or stale bytecode")

