"""Walk and hash in a forked worker process while the parent does the database work.

Per-file Python work, not BLAKE3, limits a scan, and threads do not help with it
(the GIL). A worker process does: it walks and hashes, and streams pickled batches
of records through a pipe while the parent imports SQLAlchemy, reads the baseline,
compares and writes rows — on the other core. The worker is forked before the
parent opens any database connection or starts any thread, inherits the validated
policy, never touches the database, and leaves with os._exit.
"""

from __future__ import annotations

import heapq
import os
import pickle
import signal
import struct
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter

from integrity.errors import IntegrityError, ScanWarning
from integrity.paths import to_key
from integrity.policy import Policy, Rule
from integrity.record import FileRecord, new_tuple
from integrity.scan import hasher
from integrity.scan.priority import Abandoned, current_limit
from integrity.scan.records import Hashed, hash_walk

#: A live entry (or a warning) with its database key, as the scan merges them.
Keyed = tuple[bytes, Hashed | ScanWarning]

_BATCH = 512
_DONE = b"done"
_HEADER = struct.Struct("<Q")


class Pipe:
    """Length-prefixed messages over one end of an os.pipe (multiprocessing.connection
    costs ~8 ms of imports, a good part of what `verify` of /etc may spend starting)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send_bytes(self, data: bytes) -> None:
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view):]

    def recv_bytes(self) -> bytes:
        size = _HEADER.unpack(self._exactly(_HEADER.size))[0]
        return self._exactly(size)

    def _exactly(self, size: int) -> bytes:
        parts = []
        while size:
            part = os.read(self.fd, min(size, 1 << 20))
            if not part:
                raise EOFError
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WorkerFailed(IntegrityError):
    """The scanning worker process died or reported an error."""


def _child(policy: Policy, roots: list[bytes] | None, part: int, parts: int,
           conn: Pipe, parent: int) -> None:
    # Each entry travels with its key, computed once here, as plain tuples: a
    # FileRecord pickles through a Python-level __getnewargs__ (2 µs a record against
    # 0.7 µs for its tuple). Rules travel as their root (pickled once per batch): the
    # parent has the same policy, and finds a wildcard rule's instance by it.
    batch: list[object] = []
    for item in hash_walk(policy, roots, share=(part, parts)):
        if isinstance(item, ScanWarning):
            batch.append((to_key(item.path), item))
        else:
            record, problem, entry, _ = item
            path = entry.path  # type: ignore[union-attr]
            batch.append((to_key(path), path,
                          None if record is None else tuple(record), problem,
                          entry.rule.path))  # type: ignore[union-attr]
        if len(batch) >= _BATCH:
            if orphaned(parent):
                raise Abandoned
            conn.send_bytes(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
            batch = []
    if batch:
        conn.send_bytes(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
    conn.send_bytes(_DONE)


def orphaned(parent: int) -> bool:
    """True once the parent that forked us is gone (killed outright: SIGTERM, SIGKILL).

    Our pipe may not break with it (a sibling worker forked later holds its read end
    too), so an orphan would read on to the end of the tree, at the paced rate for
    hours. Asked once per batch and before each paced sleep, off the per-file path.
    """
    return os.getppid() != parent


def stop_child(pid: int) -> None:
    """SIGTERM a forked child (once its pipe is closed, if it still runs) and reap it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


class ScanWorker:
    """One forked walk-and-hash of the policy's trees (or `roots`), read as a stream.

    With `parts` > 1 it reports only its share of the entries: those whose name
    hashes to `part` (see walker._descend). `setup` runs first in the child (the
    scan's read-rate share).
    """

    def __init__(self, policy: Policy, roots: Iterable[bytes] | None = None,
                 part: int = 0, parts: int = 1, *,
                 setup: Callable[[], None] | None = None) -> None:
        self.policy = policy
        read_end, write_end = os.pipe()  # both close on exec
        reader, writer = Pipe(read_end), Pipe(write_end)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child, reported via the pipe
            reader.close()
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                hasher.single_threaded()
                if setup is not None:
                    setup()
                limit = current_limit()
                if limit is not None:  # a paced worker spends its time asleep
                    limit.abandoned = lambda: orphaned(parent)
                _child(policy, list(roots) if roots is not None else None, part, parts,
                       writer, parent)
            except (BrokenPipeError, Abandoned):
                code = 0  # the parent stopped reading, or is gone: nothing left to do
            except BaseException as exc:  # noqa: BLE001 - reported, then exit
                try:
                    writer.send_bytes(b"error" + str(exc).encode(errors="replace"))
                except OSError:
                    pass
                code = 1
            os._exit(code)
        writer.close()
        self.reader = reader

    def __iter__(self) -> Iterator[Keyed]:
        rules: dict[bytes, Rule] = {}
        new, record = new_tuple, FileRecord
        try:
            while True:
                try:
                    data = self.reader.recv_bytes()
                except EOFError:
                    raise WorkerFailed("scan worker ended without finishing; "
                                       "nothing was changed") from None
                if data == _DONE:
                    return
                if data.startswith(b"error"):
                    raise WorkerFailed(f"scan worker failed: {data[5:].decode()}")
                for item in pickle.loads(data):
                    if len(item) == 2:  # (key, warning)
                        yield item
                        continue
                    key, path, rec, problem, root = item
                    rule = rules.get(root) or self._rule(root, rules)
                    yield key, Hashed(path, None if rec is None else new(record, rec),
                                      problem, rule)
        finally:
            self.close()

    def _rule(self, root: bytes, known: dict[bytes, Rule]) -> Rule:
        """The rule (or wildcard rule instance) a worker named by its root."""
        rule = self.policy.rule_at(root)
        if rule is None:
            raise WorkerFailed(f"scan worker named no rule at {root!r}")
        known[root] = rule
        return rule

    def close(self) -> None:
        """Stop the worker (if still running) and reap it."""
        if self.pid <= 0:
            return
        self.reader.close()
        stop_child(self.pid)
        self.pid = -1


class ScanWorkers:
    """Several workers splitting the hashing; their streams merged back in key order."""

    def __init__(self, policy: Policy, roots: Iterable[bytes] | None = None,
                 count: int = 2, *, setup: Callable[[], None] | None = None) -> None:
        start = list(roots) if roots is not None else None
        self.workers: list[ScanWorker] = []
        try:
            for part in range(count):
                self.workers.append(ScanWorker(policy, start, part, count, setup=setup))
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[Keyed]:
        """(key, entry or warning) in key order."""
        if len(self.workers) == 1:
            return iter(self.workers[0])
        # The walker gives every name to exactly one worker, whatever its type in
        # each worker's own listing, so the streams merge without duplicates, and
        # an entry and the warnings about it come in one stream, in its order.
        return heapq.merge(*self.workers, key=_first)

    def close(self) -> None:
        """Stop and reap every worker."""
        for worker in self.workers:
            worker.close()


_first = itemgetter(0)


def worker_count() -> int:
    """Hashing workers for this machine: one per core, beside the parent's own work."""
    return max(1, min(os.cpu_count() or 1, 4))
