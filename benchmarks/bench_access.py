#!/usr/bin/env python3
"""What recording reads (`access = true`) costs a reader, and how many readers it names.

Run as root (fanotify), from the repository:

    python3 benchmarks/bench_access.py [--opens 200000] [--reps 5] [--dir /dev/shm]
                                       [--cats 40] [--json FILE]

A child process opens and closes one file in a tight loop (`os.open` + `os.close`,
`--opens` times; "open+read" also reads its 30 bytes) and times itself. Cases:

- secret: the file is under an access rule (a FAN_OPEN inode mark: every open queues
  an event the listener reads);
- sibling: a file beside a file rule (`/etc/passwd` beside `/etc/shadow`): its
  directory is marked for creations and renames only;
- outside: a file elsewhere on the same filesystem;

each with the listener off and on (the AccessListener and its helper process, filing
into memory: the database is not what is measured). Runs are interleaved in a
shuffled order; the table shows the median and best µs per open, and the median's
overhead against the same case with the listener off. "counted" is how many opens of
the secret the listener reported for the run: the kernel merges an open with an
identical one still queued (same process, same file), so a tight loop counts fewer
than it made. Then --cats runs of `cat SECRET` (a reader that exits at once): how many
were named /usr/bin/cat, and how many only as "a process that exited".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrity.policy import parse  # noqa: E402
from integrity.realtime.access import AccessListener  # noqa: E402

LOOP = """
import os, sys, time
path, n, read = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
flags = os.O_RDONLY | os.O_CLOEXEC
start = time.perf_counter()
if read:
    for _ in range(n):
        fd = os.open(path, flags); os.read(fd, 64); os.close(fd)
else:
    for _ in range(n):
        os.close(os.open(path, flags))
print(time.perf_counter() - start)
"""


def loop(path: Path, opens: int, read: bool) -> float:
    out = subprocess.run([sys.executable, "-c", LOOP, str(path), str(opens),
                          "1" if read else "0"], capture_output=True, text=True, check=True)
    return float(out.stdout)


class Collected:
    def __init__(self) -> None:
        self.opens = 0
        self.reads: list[Any] = []

    def __call__(self, reads: Any) -> None:
        self.reads.extend(reads)
        self.opens += sum(r.count for r in reads)


def helper_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--opens", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--cats", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_access: run as root (fanotify needs CAP_SYS_ADMIN)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="bench-access-", dir=args.dir))
    try:
        (base / "keys").mkdir()
        secret = base / "keys" / "secret"
        sibling = base / "keys" / "sibling"
        outside = base / "outside"
        for path in (secret, sibling, outside):
            path.write_text("x" * 30)
        policy = parse({"rule": [{"path": str(secret), "access": True,
                                  "recursive": False}]})
        files = {"secret": secret, "sibling": sibling, "outside": outside}
        runs: dict[tuple[str, str, str], list[float]] = {}
        counted: list[int] = []
        cpu: list[float] = []
        plan = [(case, read, on) for case in files for read in ("open", "open+read")
                for on in ("off", "on")] * args.reps
        random.Random(7).shuffle(plan)
        for case, read, on in plan:
            if on == "on":
                sink = Collected()
                listener = AccessListener(policy, sink, update_seconds=0.0)
                listener.start()
                assert listener.available, listener.reason
                before = helper_cpu(listener.helper_pid)
                seconds = loop(files[case], args.opens, read == "open+read")
                time.sleep(1.5)  # the helper's next batch
                if case == "secret":
                    cpu.append(helper_cpu(listener.helper_pid) - before)
                listener.close()
                if case == "secret":
                    counted.append(sink.opens)
            else:
                seconds = loop(files[case], args.opens, read == "open+read")
            runs.setdefault((case, read, on), []).append(seconds)
        rows = []
        print(f"{args.opens:,} opens per run, {args.reps} runs each, {args.dir} "
              f"({os.uname().release}, {os.cpu_count()} CPUs)\n")
        print("| file | loop | listener | median µs/open | best µs/open | overhead |")
        print("|---|---|---|---|---|---|")
        for case in files:
            for read in ("open", "open+read"):
                off = statistics.median(runs[(case, read, "off")])
                for on in ("off", "on"):
                    times = runs[(case, read, on)]
                    median = statistics.median(times)
                    over = "" if on == "off" else f"{(median / off - 1) * 100:+.0f}%"
                    rows.append({"file": case, "loop": read, "listener": on,
                                 "median_us": median / args.opens * 1e6,
                                 "best_us": min(times) / args.opens * 1e6,
                                 "overhead": None if on == "off" else median / off - 1})
                    print(f"| {case} | {read} | {on} | {median / args.opens * 1e6:.2f} | "
                          f"{min(times) / args.opens * 1e6:.2f} | {over} |")
        print(f"\nopens of the secret counted per run: {sorted(counted)} of "
              f"{args.opens:,} (identical queued opens merge); helper CPU per run "
              f"{statistics.median(cpu):.2f} s median")
        named = exited = 0
        cat = os.path.realpath(shutil.which("cat") or "/usr/bin/cat")
        sink = Collected()
        listener = AccessListener(policy, sink, update_seconds=0.0)
        listener.start()
        for _ in range(args.cats):
            subprocess.run([cat, str(secret)], stdout=subprocess.DEVNULL, check=True)
            time.sleep(0.05)
        time.sleep(1.5)
        listener.close()
        for read in sink.reads:
            if read.exe == cat:
                named += read.count
            else:
                exited += read.count
        print(f"`cat SECRET`, {args.cats} runs: {named} named {cat}, {exited} recorded "
              f"as a process that exited before /proc could be read, "
              f"{args.cats - named - exited} not recorded")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"rows": rows, "counted": counted, "helper_cpu": cpu,
                 "cats": {"runs": args.cats, "named": named, "exited": exited}},
                indent=2))
        print(f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
