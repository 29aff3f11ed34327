#!/usr/bin/env python3
"""Measure `integrity watch` against issue 4's targets, with inotifywait as the anchor.

Run as root (the overflow run lowers /proc/sys/fs/inotify/max_queued_events and puts it
back; inotify-tools is installed with apt-get if inotifywait is missing):

    python3 benchmarks/bench_watch.py [--quick] [--dirs 10000] [--keep] [--json FILE]

Figures: watch set-up per 1,000 directories (in-process Watcher.start(), the daemon's
start to its "watching" line and to READY=1, and inotifywait -m -r), close-to-event
latency (median, p99) over spaced changes, the sustained change rate it keeps up with,
RSS while watching, 2,000 files written straight into 200 new directories (lost ones),
and every change reported after a forced queue overflow. Exit status: 0 all targets
met, 1 one missed, 2 the benchmark could not run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")
#: Every change the benchmark makes goes to a file not changed before: a second change
#: to a path with an open event updates that event and raises no new alert.
RESERVED_FILES = 5_000  # latency, burst and overflow runs (full size)
#: The most changes/s the sustained run offers; the tree holds enough files for it.
MAX_RATE = 1_500


# -- targets (issue 4) -----------------------------------------------------------------

SETUP_RATIO = 1.5  # watch set-up within 1.5x inotifywait's
P99_LIMIT_MS = 250.0
RSS_LIMIT_MB = 150.0


@dataclass
class Figures:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # name, value, note
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((name, value, note))
        print(f"  {name}: {value}" + (f"  ({note})" if note else ""), flush=True)

    def check(self, target: str, ok: bool | None, measured: str) -> None:
        self.checks.append((target, ok, measured))


# -- the tree, the policy, the database ----------------------------------------------

def generate(root: Path, dirs: int, per_dir: int) -> list[Path]:
    """dirs directories (sqrt(dirs) top ones), per_dir small files in each."""
    top = max(1, int(dirs ** 0.5))
    files = []
    made = 0
    for t in range(top):
        parent = root / f"t{t:03d}"
        parent.mkdir(parents=True)
        made += 1
        for i in range(per_dir):
            path = parent / f"f{i}.conf"
            path.write_bytes(b"top %d file %d\n" % (t, i))
            files.append(path)
    s = 0
    while made < dirs:
        leaf = root / f"t{s % top:03d}" / f"d{s:05d}"
        leaf.mkdir()
        for i in range(per_dir):
            path = leaf / f"f{i}.conf"
            path.write_bytes(b"dir %d file %d\n" % (s, i))
            files.append(path)
        made += 1
        s += 1
    return files


def write_policy(path: Path, tree: Path, alerts: Path) -> None:
    path.write_text(
        "[[rule]]\n"
        f"path = {json.dumps(str(tree))}\n"
        'check = "config"\nseverity = "high"\n\n'
        "[[alert]]\n"
        'type = "jsonl"\n'
        f"path = {json.dumps(str(alerts))}\n")


def integrity(work: Path) -> list[str]:
    return [sys.executable, "-m", "integrity", "--db", f"sqlite:///{work / 'bench.db'}",
            "--policy", str(work / "policy.toml")]


def ensure_inotifywait() -> bool:
    if shutil.which("inotifywait"):
        return True
    print("inotifywait missing: apt-get install inotify-tools", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "inotify-tools"],
                   stdout=subprocess.DEVNULL, check=False)
    return shutil.which("inotifywait") is not None


@contextlib.contextmanager
def queue_limit(value: int) -> Iterator[int]:
    """Lower fs.inotify.max_queued_events; always put the old value back."""
    original = QUEUE_SYSCTL.read_text().strip()
    try:
        QUEUE_SYSCTL.write_text(f"{value}\n")
        yield int(original)
    finally:
        QUEUE_SYSCTL.write_text(f"{original}\n")


def rss_kib(pid: int, peak: bool = False) -> int:
    """VmRSS (or VmHWM) of pid and all its descendants, in KiB."""
    key = "VmHWM:" if peak else "VmRSS:"
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith(key):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# -- the daemon ----------------------------------------------------------------------

class AlertTail:
    """Follows the jsonl alert file, across its size rotation, and stamps each path's
    first line as it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.arrived: dict[str, float] = {}
        self.lines = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        handle = None
        buffer = b""
        while not self._stop.is_set():
            if handle is None:
                try:
                    handle = open(self.path, "rb")
                except FileNotFoundError:
                    time.sleep(0.002)
                    continue
            chunk = handle.read()
            if not chunk:
                if self._rotated(handle):  # like tail -F: the sink rotates by size
                    chunk = handle.read()  # what was written before the rename
                    handle.close()
                    handle = None
                    if not chunk:
                        continue
                else:
                    time.sleep(0.001)
                    continue
            now = time.monotonic()
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            with self._lock:
                for line in complete:
                    self.lines += 1
                    path = json.loads(line)["path"]
                    self.arrived.setdefault(path, now)
        if handle is not None:
            handle.close()

    def _rotated(self, handle: Any) -> bool:
        try:
            return os.stat(self.path).st_ino != os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def count(self, paths: list[Path]) -> int:
        with self._lock:
            return sum(1 for p in paths if str(p) in self.arrived)

    def wait(self, paths: list[Path], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(paths) == len(paths):
                break
            time.sleep(0.01)
        return self.count(paths)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Daemon:
    """`integrity watch` with $NOTIFY_SOCKET bound here and stderr timestamped."""

    def __init__(self, work: Path, tag: str) -> None:
        self.sock_path = work / f"notify-{tag}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.lines: list[tuple[float, str]] = []
        self.began = time.monotonic()
        self.proc = subprocess.Popen(
            [*integrity(work), "watch"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "NOTIFY_SOCKET": str(self.sock_path)})
        self._reader = threading.Thread(target=self._read, name="stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from spawning to READY=1."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError("integrity watch never sent READY=1:\n" + self.log())
            self.sock.settimeout(min(left, 1.0))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                return time.monotonic() - self.began

    def line_time(self, text: str) -> float | None:
        for stamp, line in self.lines:
            if text in line:
                return stamp - self.began
        return None

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stop(self) -> tuple[int, float]:
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        self.sock.close()
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def change(path: Path, tag: bytes) -> float:
    """Rewrite a file in place with new bytes; the monotonic time of its close."""
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(tag)
    return time.monotonic()


# -- phases ---------------------------------------------------------------------------

def setup_in_process(tree: Path, work: Path, dirs: int, repeat: int = 3) -> float:
    """Best seconds for Watcher.start() over the tree, in this process (watches only)."""
    sys.path.insert(0, str(REPO))
    from integrity.policy import load
    from integrity.realtime.watcher import Watcher

    policy = load(work / "policy.toml")
    best = float("inf")
    for _ in range(repeat):
        watcher = Watcher(policy, lambda h: None, lambda: None, lambda u: None)
        try:
            began = time.perf_counter()
            count = watcher.start()
            best = min(best, time.perf_counter() - began)
        finally:
            watcher.close()
        if count != dirs + 1:  # and the rule's own directory
            raise RuntimeError(f"Watcher.start() set {count} watches for {dirs + 1} "
                               "directories")
    return best


def setup_inotifywait(tree: Path, repeat: int = 3) -> float:
    """Best seconds from spawning `inotifywait -m -r` to "Watches established."."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        proc = subprocess.Popen(["inotifywait", "-m", "-r", str(tree)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert proc.stderr is not None
            for raw in proc.stderr:
                if b"Watches established" in raw:
                    best = min(best, time.perf_counter() - began)
                    break
        finally:
            proc.terminate()
            proc.wait()
    return best


def latency(tail: AlertTail, pool: list[Path], count: int, gap: float) -> dict[str, float]:
    """Close-to-alert latency over `count` files changed `gap` seconds apart."""
    targets = [pool.pop() for _ in range(count)]
    closed = {}
    next_at = time.monotonic()
    for i, path in enumerate(targets):
        closed[str(path)] = change(path, b"latency %d\n" % i)
        next_at += gap
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    tail.wait(targets, 15)
    ms = sorted((tail.arrived[p] - t) * 1000 for p, t in closed.items() if p in tail.arrived)
    if not ms:
        return {"lost": count}
    return {"median_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))], "max_ms": ms[-1],
            "lost": count - len(ms)}


def paced(pool: list[Path], rate: float, seconds: float, tag: bytes
          ) -> tuple[list[Path], dict[str, float]]:
    """Change files at `rate` per second for `seconds`; the files and their close times."""
    total = int(rate * seconds)
    targets = [pool.pop() for _ in range(total)]
    closed = {}
    began = time.monotonic()
    for i, path in enumerate(targets):
        due = began + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        closed[str(path)] = change(path, tag + b" %d\n" % i)
    return targets, closed


def sustained(fig: Figures, daemon: Daemon, tail: AlertTail, pool: list[Path],
              rate: float, seconds: float) -> bool:
    """Offer `rate` changes/s for `seconds`; True when every one was alerted promptly."""
    targets, closed = paced(pool, rate, seconds, b"sustained")
    written_at = time.monotonic()
    got = tail.wait(targets, 30)
    lag = max((tail.arrived.get(str(p), float("inf")) for p in targets[-50:]),
              default=0.0) - written_at
    late = sorted(tail.arrived[p] - t for p, t in closed.items() if p in tail.arrived)
    p99 = late[int(len(late) * 0.99)] * 1000 if late else float("nan")
    overflowed = "overflow" in daemon.log()
    kept_up = got == len(targets) and lag < 1.0 and not overflowed
    fig.add(f"sustained {seconds:g} s at {rate:.0f} changes/s",
            f"{got:,}/{len(targets):,} alerted, p99 {p99:.0f} ms, "
            f"last alert {max(lag, 0) * 1000:.0f} ms after the last write",
            "kept up" if kept_up else ("overflowed" if overflowed else "fell behind"))
    fig.data.setdefault("sustained", []).append(
        {"rate": rate, "changes": len(targets), "alerted": got, "p99_ms": p99,
         "lag_s": lag, "overflow": overflowed, "kept_up": kept_up})
    return kept_up

def new_directories(parent: Path, dirs: int, files: int, tag: str) -> list[Path]:
    """mkdir and write files into it at once, as fast as possible (issue 4's test)."""
    written = []
    for d in range(dirs):
        directory = parent / f"{tag}{d:03d}"
        os.mkdir(directory)
        for f in range(files):
            path = directory / f"f{f}"
            with open(path, "wb") as handle:
                handle.write(b"new %d %d\n" % (d, f))
            written.append(path)
    return written


def inotifywait_new_directories(tree: Path, dirs: int, files: int) -> int:
    """How many of the CLOSE_WRITEs in new directories `inotifywait -m -r` reports."""
    parent = tree / "iw-new"
    parent.mkdir()
    proc = subprocess.Popen(["inotifywait", "-m", "-r", "-e", "close_write", "--format",
                             "%w%f", str(parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for raw in proc.stderr:
            if b"Watches established" in raw:
                break
        written = {str(p) for p in new_directories(parent, dirs, files, "iw")}
        time.sleep(1.0)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    seen = set(out.decode(errors="replace").splitlines())
    return len(written & seen)


# -- the run --------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2,000 directories, 200 latency changes, 5 s sustained")
    ap.add_argument("--dirs", type=int, help="directories in the tree (default 10,000)")
    ap.add_argument("--changes", type=int, help="latency changes (default 1,000)")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="spacing of latency changes")
    ap.add_argument("--seconds", type=float, help="sustained run length (default 20)")
    ap.add_argument("--queue", type=int, default=256,
                    help="max_queued_events for the overflow run")
    ap.add_argument("--keep", action="store_true", help="keep the tree and database")
    ap.add_argument("--setup-only", action="store_true",
                    help="only the set-up and RSS targets (issue 13: 100,000 directories)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    args.dirs = args.dirs or (2_000 if args.quick else 10_000)
    args.changes = args.changes or (200 if args.quick else 1_000)
    args.seconds = args.seconds or (5.0 if args.quick else 20.0)
    return args


class _SetupDone(Exception):
    """--setup-only: the set-up and RSS figures are in."""


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("run as root: the overflow run lowers fs.inotify.max_queued_events",
              file=sys.stderr)
        return 2
    have_iw = ensure_inotifywait()
    work = Path(tempfile.mkdtemp(prefix="integrity-bench-watch-", dir="/var/tmp"))
    tree = work / "tree"
    alerts = work / "alerts.jsonl"
    fig = Figures()
    daemon: Daemon | None = None
    tail: AlertTail | None = None
    started = time.monotonic()
    try:
        # Enough untouched files for a sustained run at MAX_RATE and a second at half.
        per_dir = -(-(RESERVED_FILES + int(1.5 * MAX_RATE * args.seconds)) // args.dirs)
        print(f"tree: {args.dirs:,} directories, {per_dir} files each, in {tree}",
              flush=True)
        pool = generate(tree, args.dirs, per_dir)
        pool.reverse()  # pop() takes files in walk order: spread over the tree
        write_policy(work / "policy.toml", tree, alerts)
        began = time.monotonic()
        subprocess.run([*integrity(work), "-q", "init"], check=True,
                       stdout=subprocess.DEVNULL)
        fig.add("init (baseline)", f"{time.monotonic() - began:.2f} s",
                f"{len(pool):,} files")

        print("watch set-up", flush=True)
        pure = setup_in_process(tree, work, args.dirs)
        per_k = pure / args.dirs * 1000
        fig.add("Watcher.start(), in-process", f"{per_k * 1000:.1f} ms / 1,000 dirs",
                f"{pure:.3f} s for {args.dirs:,}, best of 3, warm")
        fig.data["setup_in_process_s"] = pure
        iw = setup_inotifywait(tree) if have_iw else None
        if iw is not None:
            fig.add("inotifywait -m -r", f"{iw / args.dirs * 1e6:.1f} ms / 1,000 dirs",
                    f"{iw:.3f} s, spawn to 'Watches established.', best of 3")
            fig.data["setup_inotifywait_s"] = iw
            fig.check(f"watch set-up <= {SETUP_RATIO}x inotifywait (in-process start())",
                      pure <= SETUP_RATIO * iw, f"{pure / iw:.2f}x")
        else:
            fig.check("watch set-up vs inotifywait", None, "inotifywait not available")

        tail = AlertTail(alerts)
        daemon = Daemon(work, "main")
        ready = daemon.wait_ready()
        watching = daemon.line_time("watching ")
        fig.add("daemon: spawn to 'watching N directories'",
                f"{watching:.2f} s" if watching else "?",
                "interpreter, imports, policy, database, then watches")
        fig.add("daemon: spawn to READY=1", f"{ready:.2f} s",
                "includes the catch-up scan of every file")
        fig.data.update(daemon_watching_s=watching, daemon_ready_s=ready)
        rss = rss_kib(daemon.proc.pid) / 1024
        fig.add("RSS at READY", f"{rss:.1f} MiB", f"watching {args.dirs:,} directories")
        if args.setup_only:
            peak = rss_kib(daemon.proc.pid, peak=True) / 1024
            fig.add("peak RSS (VmHWM) of the daemon", f"{peak:.1f} MiB",
                    "at READY, after the catch-up scan")
            fig.check(f"RSS < {RSS_LIMIT_MB:g} MB while watching {args.dirs:,} directories",
                      peak * 1.048576 < RSS_LIMIT_MB, f"{peak * 1.048576:.1f} MB peak")
            fig.data.update(rss_ready_mib=rss, rss_peak_mib=peak)
            daemon.stop()
            daemon = None
            raise _SetupDone

        print(f"latency: {args.changes:,} changes, {args.gap_ms:g} ms apart", flush=True)
        lat = latency(tail, pool, args.changes, args.gap_ms / 1000)
        fig.data["latency"] = lat
        if "median_ms" in lat:
            fig.add("close-to-alert latency", f"median {lat['median_ms']:.0f} ms, "
                    f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms",
                    f"{lat['lost']} lost")
            fig.check(f"p99 close-to-event latency < {P99_LIMIT_MS:g} ms",
                      lat["p99_ms"] < P99_LIMIT_MS and not lat["lost"],
                      f"{lat['p99_ms']:.0f} ms, {lat['lost']} lost")
        else:
            fig.check(f"p99 close-to-event latency < {P99_LIMIT_MS:g} ms", False, "all lost")

        print("throughput: a burst as fast as possible, then a paced run", flush=True)
        burst = [pool.pop() for _ in range(min(1000, len(pool) // 4))]
        began = time.monotonic()
        for i, path in enumerate(burst):
            change(path, b"burst %d\n" % i)
        wrote = time.monotonic() - began
        got = tail.wait(burst, 60)
        drained = time.monotonic() - began
        capacity = got / drained
        fig.add("burst", f"{len(burst):,} changes written in {wrote:.2f} s, {got:,} "
                f"alerted after {drained:.2f} s",
                f"{capacity:.0f} changes/s through the daemon")
        offer = min(0.8 * capacity, MAX_RATE)  # then half that if it falls behind
        for _attempt in range(2):
            rate = min(offer, (len(pool) - 2_000) / args.seconds)
            kept_up = sustained(fig, daemon, tail, pool, rate, args.seconds)
            if kept_up:
                break
            offer = rate / 2
        fig.check("a sustained change rate it keeps up with, without overflow (no target)",
                  kept_up, f"{rate:.0f} changes/s for {args.seconds:g} s"
                  + ("" if kept_up else ": fell behind"))

        print("2,000 files written straight into 200 new directories", flush=True)
        parent = tree / "t000"
        written = new_directories(parent, 200, 10, "new")
        got = tail.wait(written, 60)
        fig.add("daemon: files in new directories", f"{got:,}/{len(written):,} reported",
                f"{len(written) - got} lost")
        fig.check("0 of 2,000 files in 200 new directories lost", got == len(written),
                  f"{len(written) - got} lost")
        peak = rss_kib(daemon.proc.pid, peak=True) / 1024
        fig.add("peak RSS (VmHWM) of the daemon", f"{peak:.1f} MiB", "after all of the above")
        fig.check(f"RSS < {RSS_LIMIT_MB:g} MB while watching {args.dirs:,} directories",
                  peak * 1.048576 < RSS_LIMIT_MB, f"{peak * 1.048576:.1f} MB peak")
        fig.data.update(rss_ready_mib=rss, rss_peak_mib=peak, new_dirs_lost=len(written) - got)
        code, took = daemon.stop()
        fig.add("SIGTERM to exit", f"{took:.2f} s", f"exit status {code}")
        daemon = None
        if have_iw:
            seen = inotifywait_new_directories(tree, 200, 10)
            fig.add("inotifywait: files in new directories", f"{seen:,}/2,000 reported",
                    f"{2000 - seen} lost ({(2000 - seen) / 20:.1f}%)")

        print(f"overflow: max_queued_events={args.queue}, reader stopped, then resumed",
              flush=True)
        with queue_limit(args.queue):
            daemon = Daemon(work, "overflow")  # the limit is read at inotify_init
            daemon.wait_ready()
        stalled = [pool.pop() for _ in range(min(2_000, len(pool)))]
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            for i, path in enumerate(stalled):
                change(path, b"stalled %d\n" % i)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        got = tail.wait(stalled, 120)
        took = time.monotonic() - resumed
        said = "overflow" in daemon.log()
        fig.add("after a queue overflow", f"{got:,}/{len(stalled):,} reported in {took:.1f} s",
                "overflow logged" if said else "NO overflow logged")
        fig.check("every change reported after a queue overflow",
                  got == len(stalled) and said,
                  f"{len(stalled) - got} missing{'' if said else ', overflow not logged'}")
        fig.data["overflow"] = {"changes": len(stalled), "reported": got, "seconds": took,
                                "logged": said}
        daemon.stop()
        daemon = None
    except _SetupDone:
        pass
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if daemon is not None:
            daemon.kill()
        if tail is not None:
            tail.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    report(fig, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps({"figures": fig.rows, "checks": fig.checks,
                                         "data": fig.data}, indent=2))
    return 1 if any(ok is False for _, ok, _ in fig.checks) else 0


def report(fig: Figures, elapsed: float) -> None:
    width = max(len(name) for name, _, _ in fig.rows)
    print(f"\n{'measure'.ljust(width)}  value")
    for name, value, note in fig.rows:
        print(f"{name.ljust(width)}  {value}" + (f"  ({note})" if note else ""))
    print()
    for target, ok, measured in fig.checks:
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        print(f"{verdict}  {target}: {measured}")
    print(f"\n(run took {elapsed:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
