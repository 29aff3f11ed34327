"""A whole baseline read and seal-checked in a forked process, beside the scan.

A whole-tree verify reads every row and hashes each into the seal's Merkle tree:
~8 µs of per-row Python, on the process that also walks, merges and compares. Here
a child process does the reading and the sealing on another core and hands the rows
over as pickled batches (~2 µs a row to take back). The rows the scan compares are
the very rows the child sealed, so its verdict covers them; the verdict arrives
after the last row, before anything of the scan is recorded.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

from integrity.errors import IntegrityError
from integrity.ops.seal import KeptTexts, check_root
from integrity.paths import from_key
from integrity.record import FileRecord, new_tuple
from integrity.scan.priority import Abandoned
from integrity.scan.workers import Pipe, orphaned, stop_child
from integrity.trust import LEAF_BATCH, EntriesRoot, TrustError

if TYPE_CHECKING:
    from integrity.store import BaselineInfo, Store

# Message tags: the child's snapshot of the baseline, a batch of rows, the end with
# the seal holding, a seal that does not hold, any other failure.
_INFO, _ROWS, _SEALED, _TAMPERED, _FAILED = b"I", b"R", b"S", b"T", b"E"


class SealReaderFailed(IntegrityError):
    """The process reading the baseline died or reported an error."""


class SealReader:
    """The baseline in force, streamed by a child that checks it against its seal.

    Construct it where no other thread uses `store` (the CLI's verify): its
    connections are closed first, so none crosses the fork, and both processes
    reconnect. Use as a context manager; `entries()` raises TrustError after the last
    row if the rows do not hash to the recorded root.
    """

    def __init__(self, store: Store) -> None:
        store.close()
        read_end, write_end = os.pipe()
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child, reported via the pipe
            os.close(read_end)
            os._exit(_child(store, Pipe(write_end), parent))
        os.close(write_end)
        self.pipe = Pipe(read_end)
        #: The kept text digests, for the diffs of what the scan finds changed.
        self.kept = KeptTexts()
        self.sealed = False
        try:
            tag, body = self._next()
            if tag != _INFO:
                self._fail(tag, body)
        except BaseException:
            self.close()  # no `with` reaps a child whose constructor raised
            raise
        #: The baseline as the child's read transaction saw it.
        self.info: BaselineInfo = pickle.loads(body)

    def __enter__(self) -> SealReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def entries(self) -> Iterator[tuple[bytes, FileRecord]]:
        """(key, record) of every entry in key order, as the scan's merge takes them."""
        keep = self.kept.add
        new, record = new_tuple, FileRecord
        while True:
            tag, body = self._next()
            if tag != _ROWS:
                if tag == _SEALED:
                    self.sealed = True
                    return
                self._fail(tag, body)
            for row in pickle.loads(body):
                key = row[0]
                if row[15] is not None:
                    keep(key, row[15])
                yield key, new(record, (from_key(key), *row[1:14]))

    def finish(self) -> None:
        """Take what the scan left unread; raise unless the seal held over all of it."""
        if not self.sealed:
            for _ in self.entries():
                pass

    def close(self) -> None:
        """Stop the child (if still running) and reap it."""
        if self.pid <= 0:
            return
        self.pipe.close()
        stop_child(self.pid)
        self.pid = -1

    def _next(self) -> tuple[bytes, bytes]:
        try:
            data = self.pipe.recv_bytes()
        except EOFError:
            raise SealReaderFailed("the baseline reader ended without finishing; "
                                   "nothing was recorded") from None
        return data[:1], data[1:]

    @staticmethod
    def _fail(tag: bytes, body: bytes) -> NoReturn:
        message = body.decode(errors="replace")
        if tag == _TAMPERED:
            raise TrustError(message)
        raise SealReaderFailed(f"the baseline reader failed: {message}")


def _child(store: Store, pipe: Pipe, parent: int) -> int:
    """Read the baseline in one transaction, seal-check it, send it; the exit code."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        with store.baselines.snapshot() as snap:
            info = snap.require()
            pipe.send_bytes(_INFO + pickle.dumps(info, pickle.HIGHEST_PROTOCOL))
            root = EntriesRoot(info.seal_version)
            for rows in snap.row_batches(LEAF_BATCH):
                root.add_rows(rows)
                if orphaned(parent):
                    raise Abandoned
                pipe.send_bytes(_ROWS + pickle.dumps(rows, pickle.HIGHEST_PROTOCOL))
        check_root(info, root.hexdigest())
        pipe.send_bytes(_SEALED)
        return 0
    except (BrokenPipeError, Abandoned):
        return 0  # the parent stopped reading, or is gone: nothing left to do
    except TrustError as exc:
        return _report(pipe, _TAMPERED, exc)
    except BaseException as exc:  # noqa: BLE001 - reported, then exit
        return _report(pipe, _FAILED, exc)


def _report(pipe: Pipe, tag: bytes, exc: BaseException) -> int:
    try:
        pipe.send_bytes(tag + str(exc).encode(errors="replace"))
    except OSError:
        pass
    return 1
