"""Walk -> hash -> compare: the per-file hot path, with no database and no events.

`TreeScan` scans the policy's trees against a baseline stream; `check_entries`
re-checks single paths; `read_state` reads what an approval writes. The walker never
follows a symlink or leaves a rule's filesystem, the records pipeline hashes safely
(O_NOFOLLOW, fstat against the walk's lstat, torn-write guard), and workers spread
the hashing over the cores.
"""

from __future__ import annotations

from integrity.scan.records import Hashed, Progress
from integrity.scan.scanner import (Outcome, ScanResult, TreeScan, check_entries,
                                    normalize_paths, read_state, worker_processes)

__all__ = ["Hashed", "Outcome", "Progress", "ScanResult", "TreeScan", "check_entries",
           "normalize_paths", "read_state", "worker_processes"]
