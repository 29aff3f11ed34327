#!/usr/bin/env python3
"""What the fanotify actor listener costs a writer, and why it marks directories.

Run as root (fanotify needs CAP_SYS_ADMIN), from the repository:

    python3 benchmarks/bench_fanotify.py [--quick] [--reps 5] [--dir /dev/shm]
                                         [--capture 40] [--json FILE]

Three write-heavy workloads, each run by a child process that times itself (no fsync;
`sync` before every run, so the previous run's dirty pages are not billed to this one):

- small: 20,000 new 100-byte files in 100 directories, then each rewritten once;
- big: one 1 GiB file written sequentially in 1 MiB chunks;
- appends: 200,000 appends of 512 bytes to one file (a log or database writer).

Inside a protected tree, each runs with:
- none: no listener;
- inotify: the project's own inotify Watcher, on a thread here: the reference, since
  the daemon pays for it already (a directory watch costs every write() a look at the
  parent's marks, inotify's and fanotify's alike);
- fid: the ActorListener (FID mode, an inode mark per directory);
- inotify+fid: both, as in the daemon once the listener is wired in (the CPU column
  is then the listener's alone);
- fid+modify: the listener also asking for FAN_MODIFY, an event per write() call;
- classic: the listener forced into classic mode (a filesystem mark, an fd per event).

Outside it, on the same filesystem: none, fid, and the rejected alternative, fs-wide:
one FAN_MARK_FILESYSTEM mark whose reader (a process, as the helper is) does what such
a listener must for each event: resolve the directory handle with open_by_handle_at
(cached) and test the path against the protected root.

Runs are interleaved in a shuffled order; the table shows the median and best of
--reps, the median's overhead against no listener, the listener's CPU time (helper
process plus the filing thread here; the fs-wide reader's own) and, after each inside
run with the listener, how many written paths actor_for() attributes to the workload's
pid. Then --capture runs of five short-lived commands (touch, chmod, cp, mkdir,
sed -i), idle and with a Python thread spinning in this process: full actor, partial
(read after exit, before the reap: uid, login uid, comm) or gone.

The default directory is tmpfs, so the disk does not drown the listener's cost in
noise: on ext4 (--dir /var/tmp) some runs of the 1 GiB write stall for 1.8 s on
writeback, whichever configuration they belong to.

Reference (Debian 12 guest, kernel 6.18, 2 CPUs, tmpfs, 5 reps; median s, overhead):

| workload | writes | none | inotify | fid | inotify+fid | fid+modify | classic | fs-wide |
|---|---|---|---|---|---|---|---|---|
| small | inside | 0.163 | +15% | +22% | +60% | +31% | +20% | |
| small | outside | 0.167 | | -1% | | | | +34% |
| big | inside | 0.297 | -1% | 0% | 0% | +7% | -1% | |
| big | outside | 0.295 | | -2% | | | | 0% |
| appends | inside | 0.096 | +8% | +10% | +11% | +103% | +4% | |
| appends | outside | 0.100 | | -4% | | | | -4% |

Run to run, the small-file overheads move by about 5 points (fid +17% to +22%,
inotify+fid +52% to +60%; in the best run of each, inotify+fid costs +34% to +38%).
Listener CPU for the 20,000 files: 0.11 s (fid), 0.19 s (classic); the fs-wide reader
spent 0.19 s reading and dropping 54,299 events of writes it did not care about. All
20,000 paths were attributed in every run. Short-lived writers, of 40 runs, full /
partial / gone, idle then beside a busy thread: chmod 25/11/4, 36/4/0; cp 25/15/0,
35/5/0; touch 20/9/11, 39/1/0; sed -i 40/0/0, 39/1/0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from integrity.realtime.actor import ActorListener  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOAD = r'''
import os, sys, time
kind, top, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.perf_counter()
paths = []
if kind == "small":
    files = int(20000 * scale)
    dirs = [os.path.join(top, "d%03d" % i) for i in range(100)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    data = b"x" * 100
    for i in range(files):
        path = os.path.join(dirs[i % 100], "f%05d" % i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        paths.append(path)
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"y" * 100)
        os.close(fd)
elif kind == "big":
    path = os.path.join(top, "big")
    chunk = b"z" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(int(1024 * scale)):
        os.write(fd, chunk)
    os.close(fd)
    paths.append(path)
elif kind == "appends":
    path = os.path.join(top, "log")
    chunk = b"l" * 511 + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    for _ in range(int(200000 * scale)):
        os.write(fd, chunk)
    os.close(fd)
    paths.append(path)
elapsed = time.perf_counter() - start
with open(os.path.join(top, ".paths"), "w") as out:
    out.write("\n".join(paths))
print(elapsed)
'''

# -- the rejected alternative: one mark on the whole filesystem ------------------------

FS_READER = r'''
import ctypes, os, resource, select, sys
sys.path.insert(0, sys.argv[1])
from integrity.realtime import fanotify as fan
from integrity.realtime.marks import DIR_MASK
from integrity.paths import is_within
roots = [os.fsencode(r) for r in sys.argv[2:]]
fd = fan.init(fan.FAN_CLASS_NOTIF | fan.FAN_REPORT_DFID_NAME | fan.FAN_CLOEXEC
              | fan.FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
mask = DIR_MASK & ~fan.FAN_EVENT_ON_CHILD
fan.mark(fd, fan.FAN_MARK_ADD | fan.FAN_MARK_FILESYSTEM, mask, path=roots[0])
libc = ctypes.CDLL(None, use_errno=True)
libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
mount_fd = os.open(roots[0], os.O_RDONLY | os.O_DIRECTORY)
cache = {}
def resolve(key):
    # key: fsid (8 bytes), then a struct file_handle as open_by_handle_at takes it
    if key not in cache:
        dfd = libc.open_by_handle_at(mount_fd, key[8:], os.O_PATH)
        if dfd < 0:
            cache[key] = None
        else:
            try:
                cache[key] = os.readlink(b"/proc/self/fd/%d" % dfd)
            finally:
                os.close(dfd)
    return cache[key]
print("ready", flush=True)
poller = select.poll()
poller.register(fd, select.POLLIN)
poller.register(0, select.POLLIN)
events = kept = 0
while True:
    stop = False
    for ready, _ in poller.poll():
        if ready == 0:
            stop = True
            continue
        while True:
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                break
            for _mask, _pid, _fd, key, name in fan.events(buf):
                events += 1
                base = resolve(key) if key is not None else None
                if base is None:
                    continue
                path = base if name in (None, b".") else base + b"/" + name
                if any(is_within(path, r) for r in roots):
                    kept += 1
    if stop:
        break
usage = resource.getrusage(resource.RUSAGE_SELF)
print(events, kept, usage.ru_utime + usage.ru_stime, flush=True)
'''


class InotifyReference:
    """The project's own inotify Watcher over the protected tree, on a thread: what the
    daemon already costs a writer before any fanotify listener is added."""

    def __init__(self, protected: Path) -> None:
        from integrity.policy import parse
        from integrity.realtime.watcher import Watcher

        policy = parse({"rule": [{"path": str(protected), "check": "config"}]})
        self.watcher = Watcher(policy, lambda _hints: None, lambda: None,
                               lambda _unwatched: None)
        self.watcher.start()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watcher.run, args=(self.stop,),
                                       name="inotify", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.watcher.close()


class FsWideReader:
    """The FS_READER script in a process of its own, as the helper would be."""

    def __init__(self, roots: list[Path]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", FS_READER, str(REPO),
                                      *map(str, roots)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid
        self.events = 0
        self.cpu = 0.0

    def close(self) -> None:
        """Stop it once it has read everything queued; its event count and CPU time."""
        out, _ = self.proc.communicate("", timeout=120)
        events, _kept, cpu = out.split()
        self.events, self.cpu = int(events), float(cpu)


# -- measuring -------------------------------------------------------------------------

def cpu_of(pid: int, tid: int | None = None) -> float:
    """utime + stime of a live process (or one of its threads), in seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path, "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_workload(kind: str, top: Path, scale: float) -> tuple[float, int, list[bytes]]:
    """(seconds the child measured, its pid, the paths it wrote)."""
    if top.exists():
        shutil.rmtree(top)
    top.mkdir(parents=True)
    os.sync()  # the previous run's dirty pages are not this run's to write
    child = subprocess.Popen([sys.executable, "-S", "-c", WORKLOAD, kind, str(top),
                              str(scale)], stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"workload {kind} failed")
    paths = [os.fsencode(p) for p in (top / ".paths").read_text().splitlines()]
    return float(out), child.pid, paths


def one_run(kind: str, where: str, listener: str, base: Path, scale: float
            ) -> dict[str, Any]:
    protected = base / "protected"
    top = (protected if where == "inside" else base / "outside" / "work") / kind
    actor: ActorListener | None = None
    fs_reader: FsWideReader | None = None
    inotify: InotifyReference | None = None
    helper_pid = None
    started = time.perf_counter()
    if listener.startswith("inotify"):
        inotify = InotifyReference(protected)
    if listener in ("fid", "inotify+fid", "fid+modify", "classic"):
        actor = ActorListener([os.fsencode(protected)], fid=listener != "classic",
                              modify=listener == "fid+modify")
        actor.start()
        if not actor.available:
            raise SystemExit(f"listener unavailable: {actor.reason}")
        helper_pid = actor.helper_pid
    elif listener == "fs-wide":
        fs_reader = FsWideReader([protected])
        helper_pid = fs_reader.pid
    setup = time.perf_counter() - started
    helper_before = cpu_of(helper_pid) if helper_pid else 0.0
    # The listener's filing thread, by its own counters (not the benchmark's work).
    filer = actor._thread.native_id if actor is not None and actor._thread else None
    if inotify is not None and actor is None:
        filer = inotify.thread.native_id
    filer_before = cpu_of(os.getpid(), filer) if filer else 0.0
    seconds, pid, paths = run_workload(kind, top, scale)
    result: dict[str, Any] = {"seconds": seconds, "setup": setup}
    if actor is not None:
        if where == "inside":  # let the listener catch up before its CPU is read
            deadline = time.monotonic() + 30
            while actor.actor_for(paths[-1]).get("pid") != pid \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(0.1)
        assert helper_pid is not None and filer is not None
        result["cpu"] = (cpu_of(helper_pid) - helper_before
                         + cpu_of(os.getpid(), filer) - filer_before)
        if where == "inside":
            result["attributed"] = sum(1 for p in paths
                                       if actor.actor_for(p).get("pid") == pid)
            result["paths"] = len(paths)
        actor.close()
        if inotify is not None:
            inotify.close()
    elif inotify is not None:
        time.sleep(0.3)  # its coalescing window, then the last batch
        assert filer is not None
        result["cpu"] = cpu_of(os.getpid(), filer) - filer_before
        inotify.close()
    elif fs_reader is not None:
        fs_reader.close()
        result["cpu"] = fs_reader.cpu - helper_before
        result["events"] = fs_reader.events
    shutil.rmtree(top)
    return result


# -- short-lived writers: is /proc read before they are gone? ----------------------------

SHORT_LIVED = {"touch": 'exec touch "$1"', "chmod": 'exec chmod 600 "$1"',
               "cp": 'exec cp /etc/hostname "$1"', "mkdir": 'exec mkdir "$1.d"',
               "sed -i": 'exec sed -i s/a/b/ "$1"'}


def capture(base: Path, count: int, busy: bool) -> dict[str, Counter[str]]:
    """Run each short-lived command `count` times; how complete was each actor?

    full: exe and command line read; partial: read after it exited but before it was
    reaped (uid, login uid and comm only); gone: reaped before /proc was read. With
    `busy`, a Python thread spins in this process (the daemon's process, where the
    listener's filing thread lives) the whole time, as a scan would.
    """
    tree = base / ("capture-busy" if busy else "capture")
    tree.mkdir()
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    listener = ActorListener([os.fsencode(tree)])
    listener.start()
    found: dict[str, Counter[str]] = {}
    try:
        for name, script in SHORT_LIVED.items():
            tally: Counter[str] = Counter()
            for i in range(count):
                path = tree / f"{name.replace(' ', '')}-{i}"
                path.write_text("a\n")  # by us: the listener ignores it
                subprocess.run(["sh", "-c", script, "sh", str(path)], check=True)
                target = os.fsencode(path) + (b".d" if name == "mkdir" else b"")
                deadline = time.monotonic() + 2
                while True:
                    actor = listener.actor_for(target)
                    why = str(actor.get("unknown", ""))
                    if not why.startswith("no fanotify") or time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
                tally["full" if not why else "partial" if actor["uid"] is not None
                      else "gone" if "exited" in why else "other"] += 1
            found[name] = tally
    finally:
        listener.close()
        stop.set()
        if busy:
            spinner.join()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the sizes, 3 reps")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dir", default="/dev/shm",
                        help="where the trees go (default tmpfs: no disk noise)")
    parser.add_argument("--capture", type=int, default=40, metavar="N",
                        help="runs of each short-lived command (0: skip)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: fanotify needs CAP_SYS_ADMIN", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)  # classic mode warns at every start
    scale = 0.25 if args.quick else 1.0
    reps = args.reps or (3 if args.quick else 5)
    base = Path(tempfile.mkdtemp(prefix="bench-fanotify-", dir=args.dir))
    (base / "protected").mkdir()
    (base / "outside").mkdir()
    plan = [(kind, where, listener)
            for kind in ("small", "big", "appends")
            for where, listeners in (("inside", ("none", "inotify", "fid", "inotify+fid",
                                                 "fid+modify", "classic")),
                                     ("outside", ("none", "fid", "fs-wide")))
            for listener in listeners]
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {key: [] for key in plan}
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, {reps} reps, "
          f"scale {scale:g}, trees in {base}", flush=True)
    try:
        for kind, where, listener in plan:  # warm-up: page cache, dentries, interpreter
            if listener == "none":
                run_workload(kind, base / "warm", scale)
        captured = {busy: capture(base, args.capture, busy) for busy in (False, True)
                    if args.capture}
        for rep in range(reps):
            order = list(plan)
            random.Random(rep).shuffle(order)  # no configuration always follows another
            for key in order:
                results[key].append(one_run(*key, base=base, scale=scale))
            print(f"  rep {rep + 1}/{reps} done", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for kind, where, listener in plan:
        runs = results[(kind, where, listener)]
        median = statistics.median(r["seconds"] for r in runs)
        baseline = statistics.median(r["seconds"] for r in results[(kind, where, "none")])
        row = {"workload": kind, "where": where, "listener": listener,
               "median_s": round(median, 3),
               "min_s": round(min(r["seconds"] for r in runs), 3),
               "overhead_pct": round((median / baseline - 1) * 100, 1),
               "listener_cpu_s": (round(statistics.median(r["cpu"] for r in runs), 3)
                                  if "cpu" in runs[0] else None),
               "setup_s": round(statistics.median(r["setup"] for r in runs), 3)}
        if "attributed" in runs[0]:
            row["attributed"] = f"{min(r['attributed'] for r in runs)}/{runs[0]['paths']}"
        if "events" in runs[0]:
            row["events_read"] = int(statistics.median(r["events"] for r in runs))
        rows.append(row)
    header = ("| workload | writes | listener | median s | min s | overhead | "
              "listener CPU s | attributed (worst run) |")
    print()
    print(header)
    print("|" + "---|" * 8)
    for row in rows:
        extra = row.get("attributed") or (f"{row['events_read']:,} events read"
                                          if "events_read" in row else "")
        cpu = "" if row["listener_cpu_s"] is None else f"{row['listener_cpu_s']:.2f}"
        overhead = "" if row["listener"] == "none" else f"{row['overhead_pct']:+.1f}%"
        print(f"| {row['workload']} | {row['where']} | {row['listener']} | "
              f"{row['median_s']:.3f} | {row['min_s']:.3f} | {overhead} | {cpu} | "
              f"{extra} |")
    if captured:
        print()
        print(f"| short-lived writer ({args.capture} runs) | idle: full / partial / gone "
              "| busy Python thread: full / partial / gone |")
        print("|---|---|---|")
        for name in SHORT_LIVED:
            cells = [" / ".join(str(captured[busy][name][k])
                                for k in ("full", "partial", "gone"))
                     for busy in (False, True)]
            print(f"| {name} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"runs": rows, "capture": {("busy" if busy else "idle"): dict(found)
                                       for busy, found in captured.items()}},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
