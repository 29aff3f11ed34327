#!/usr/bin/env python3
"""Time `integrity init` / `verify` against `b3sum`, `find` and AIDE, and check SPEC's
"Performance and scale" targets on three trees (issue 13).

Run as root (cold-cache runs drop the page cache; b3sum and aide are installed with
apt-get if missing):

    python3 benchmarks/bench_baseline.py                       # all trees, integrity from PATH
    python3 benchmarks/bench_baseline.py --trees 20k --no-aide --no-cold   # quick
    python3 benchmarks/bench_baseline.py --python-module       # python3 -m integrity
    python3 benchmarks/bench_baseline.py --cache /var/tmp/integrity-bench --json out.json

Trees: `20k` (20,000 files, 1 GiB, generated), `usr` (this machine's /usr), `1m`
(1,000,000 files of 50-4,000 bytes in 10,000 directories, generated). Generated trees
are cached in --cache (default /var/tmp/integrity-bench) and reused while their
parameters match. Also measured: `integrity verify` of /etc as a whole process, and
the watcher's peak RSS after its catch-up scan of the 1M tree.

Exit status: 0 every target met (or not measured), 1 a target missed, 2 a command failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = ".bench-params.json"
KIB, MIB, MB = 1024, 1024 * 1024, 1_000_000
SMALL = (1 * KIB, 16 * KIB)
LARGE = (256 * KIB, 2 * MIB)
BYTES_PER_FILE = (1 << 30) // 20_000  # 1 GiB for the default 20,000 files
FIND_FMT = "%s %T@ %i %m %U %G\\n"
REPO = Path(__file__).resolve().parent.parent
#: integrity.scan.hasher.RECENT_NS in seconds (not imported: this script's RSS is the floor
#: every child's peak RSS starts from).
FRESH_S = 10

#: The generated trees: name -> parameters (see generate()).
GENERATED = {
    "20k": ("tree20k", {"files": 20_000, "dirs": 400, "bytes": 20_000 * BYTES_PER_FILE,
                        "seed": 1}),
    "1m": ("tree1m", {"files": 1_000_000, "dirs": 10_000, "bytes": 0, "seed": 1,
                      "sizes": [50, 4000]}),
}

# -- targets (SPEC "Performance and scale", issue 13) ---------------------------------------
INIT_WARM = 1.3      # init / b3sum, warm
INIT_COLD = 1.0      # init / b3sum, cold
VERIFY_WARM = 1.3    # verify / b3sum
FAST_FIND = 3.0      # verify --fast / find
ETC_SECONDS = 0.3    # whole `integrity verify` of /etc
RSS_MB = 150.0       # init, verify, watch at 1M entries (and everywhere)
DB_BYTES = 200.0     # database bytes per entry
AIDE_INIT = 5.0      # AIDE init / our init, at least
AIDE_CHECK = 10.0    # AIDE check / our verify, at least


@dataclass(frozen=True)
class Command:
    """A command to time, and the exit codes that are fine."""

    name: str
    argv: list[str]
    ok: tuple[int, ...] = (0,)


@dataclass
class Result:
    """Wall times, exit codes and peak RSS (KiB) of the runs of one command."""

    cmd: Command
    runs: list[float] = field(default_factory=list)
    codes: set[int] = field(default_factory=set)
    rss_kib: int = 0

    def add(self, wall: float, code: int, rss_kib: int) -> None:
        """One timed run's figures."""
        self.runs.append(wall)
        self.codes.add(code)
        self.rss_kib = max(self.rss_kib, rss_kib)

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class Target:
    tree: str
    label: str
    value: float | None
    limit: float
    higher_is_better: bool = False
    unit: str = "x"
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "FAIL"


class BenchError(Exception):
    """The benchmark cannot go on: a command failed, or a tree is not ours to overwrite."""


# -- trees ----------------------------------------------------------------------------------

def plan_sizes(n: int, total: int, rng: random.Random) -> list[int]:
    """Return n sizes, mostly 1-16 KiB and a few 256 KiB-2 MiB, summing to `total` if possible."""
    small_mean, large_mean = sum(SMALL) / 2, sum(LARGE) / 2
    n_large = max(0, min(n, round((total - n * small_mean) / (large_mean - small_mean))))
    small = [rng.randint(*SMALL) for _ in range(n - n_large)]
    large = [rng.randint(*LARGE) for _ in range(n_large)]
    if large:
        scale = (total - sum(small)) / sum(large)
        large = [min(LARGE[1], max(SMALL[1], int(s * scale))) for s in large]
        short = total - sum(small) - sum(large)
        for i, size in enumerate(large):  # spread the rounding remainder where there is room
            room = LARGE[1] - size if short > 0 else size - SMALL[1]
            step = max(-room, min(room, short))
            large[i] += step
            short -= step
            if not short:
                break
    sizes = small + large
    rng.shuffle(sizes)
    return sizes


def generate(root: Path, params: dict[str, Any]) -> None:
    """Write the tree: files spread over `dirs` leaf directories under sqrt(dirs) top
    ones; sizes uniform in `sizes` when given (then `bytes` is 0: their sum), else
    planned to sum to `bytes`."""
    rng = random.Random(params["seed"])
    if "sizes" in params:
        low, high = params["sizes"]
        sizes = [rng.randint(low, high) for _ in range(params["files"])]
    else:
        sizes = plan_sizes(params["files"], params["bytes"], rng)
    top = max(1, round(math.sqrt(params["dirs"])))
    leaves = [root / f"d{i % top:03d}" / f"s{i // top:03d}" for i in range(params["dirs"])]
    for leaf in leaves:
        leaf.mkdir(parents=True, exist_ok=True)
    # One random block sliced at random offsets, behind a per-file header, is as costly to
    # hash as fresh random data and much faster to produce.
    longest = params["sizes"][1] if "sizes" in params else LARGE[1]
    block = memoryview(rng.randbytes(longest + MIB))
    for i, size in enumerate(sizes):
        header = f"{params['seed']}:{i}\n".encode()[:size]
        offset = rng.randrange(len(block) - size)
        with open(leaves[i % len(leaves)] / f"f{i:06d}.bin", "wb") as out:
            out.write(header)
            out.write(block[offset:offset + size - len(header)])
    os.sync()  # so that writeback does not run during the first timings


def prepare_tree(root: Path, params: dict[str, Any]) -> None:
    """Reuse or (re)generate the tree at root."""
    marker = root / MARKER
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("complete") and old.get("params") == params:
            print(f"reusing the tree in {root}", flush=True)
            return
        shutil.rmtree(root)  # ours (it has a marker), but other parameters or unfinished
    elif root.exists() and any(root.iterdir()):
        raise BenchError(f"{root} is not empty and has no {MARKER}: refusing to overwrite it")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "complete": False}))
    start = time.perf_counter()
    print(f"generating {root} ...", flush=True)
    generate(root, params)
    marker.write_text(json.dumps({"params": params, "complete": True}))
    print(f"generated {root} in {time.perf_counter() - start:.1f} s", flush=True)


def age_tree(root: Path) -> None:
    """Wait until the newest file of a generated tree is older than FRESH_S.

    integrity reads a file changed in the last seconds twice, since it may be inside
    a write (hasher.RECENT_NS). A protected tree is not written seconds before its
    baseline, so a freshly generated one is let age before anything is timed.
    """
    wait = os.stat(root / MARKER).st_ctime + FRESH_S + 0.5 - time.time()
    if wait > 0:
        print(f"letting the fresh tree age {wait:.1f} s", flush=True)
        time.sleep(wait)


def count_tree(root: Path) -> tuple[int, int, int]:
    """(regular files, their bytes, all entries) without crossing filesystems, as the
    commands see them."""
    dev = os.lstat(root).st_dev
    files = size = entries = 0
    for top, dirs, names in os.walk(root):
        entries += len(dirs) + len(names)
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == dev]
        for name in names:
            st = os.lstat(os.path.join(top, name))
            if st.st_mode & 0o170000 == 0o100000:
                files += 1
                size += st.st_size
    return files, size, entries + 1


# -- tools ----------------------------------------------------------------------------------

def ensure_tool(command: str, package: str) -> bool:
    """Install a Debian package for a missing command; True when it is there."""
    if shutil.which(command):
        return True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL)
    return shutil.which(command) is not None


def drop_caches() -> None:
    """Write back dirty pages, then empty the page, dentry and inode caches."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_once(cmd: Command, errlog: Path) -> tuple[float, int, int]:
    """Run cmd; return (wall s, exit code, ru_maxrss KiB of it and the children it reaped)."""
    with open(errlog, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # so Popen does not reap again
    if code not in cmd.ok:
        stderr = errlog.read_text(errors="replace").strip()[-3000:]
        raise BenchError(f"{cmd.name!r} exited {code}: {' '.join(cmd.argv)}\n{stderr}")
    return wall, code, usage.ru_maxrss


def measure(cmd: Command, runs: int, errlog: Path, *, warm_up: bool = True,
            cold: bool = False) -> Result:
    """Warm: a warm-up run, then `runs` timed runs. Cold: each run after a cache drop."""
    result = Result(cmd)
    if warm_up and not cold:
        run_once(cmd, errlog)
    for _ in range(runs):
        if cold:
            drop_caches()
        result.add(*run_once(cmd, errlog))
    _print_result(result)
    return result


def measure_rounds(cmds: list[Command], runs: int, errlog: Path) -> dict[str, Result]:
    """Warm, side by side: a warm-up run of each command, then `runs` rounds that run
    each command once in turn, so that a machine that drifts (a neighbour, the CPU's
    clock) moves every command's figures alike instead of only those measured then."""
    results = {cmd.name: Result(cmd) for cmd in cmds}
    for cmd in cmds:
        run_once(cmd, errlog)
    for _ in range(runs):
        for cmd in cmds:
            results[cmd.name].add(*run_once(cmd, errlog))
    for result in results.values():
        _print_result(result)
    return results


def _print_result(result: Result) -> None:
    print(f"  {result.cmd.name:<22} best {result.best:8.3f} s  median {result.median:8.3f} s"
          f"  peak RSS {result.rss_kib * KIB / MB:6.1f} MB"
          + (f"  (exit {sorted(result.codes)})" if result.codes - {0} else ""), flush=True)


def compile_package(integrity: list[str]) -> None:
    """Byte-compile the installed package, as a real install does (an editable install
    under PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module every run)."""
    python = interpreter_of(integrity)
    probe = subprocess.run([python, "-c", "import integrity, os; "
                            "print(os.path.dirname(integrity.__file__))"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        subprocess.run([python, "-m", "compileall", "-q", probe.stdout.strip()],
                       capture_output=True)


def interpreter_of(integrity: list[str]) -> str:
    """The Python that runs `integrity` (the console script's #! line)."""
    if integrity[0].endswith(("python", "python3")):
        return integrity[0]
    with open(integrity[0], "rb") as script:
        first = script.readline()
    return first[2:].strip().decode() if first.startswith(b"#!") else sys.executable


def aide_commands(root: Path, work: Path) -> tuple[Command, Command]:
    """Debian's AIDE over the same tree: sha256 and the same stat fields, 2 workers."""
    conf = work / "aide.conf"
    conf.write_text(
        f"database_in=file:{work}/aide.db\n"
        f"database_out=file:{work}/aide.db.new\n"
        "gzip_dbout=no\nnum_workers=2\nreport_url=stdout\n"
        "Checks = p+i+n+u+g+s+m+c+sha256\n"
        f"{root} Checks\n")
    init = Command("aide --init", ["aide", "--config", str(conf), "--init"])
    check = Command("aide --check", ["aide", "--config", str(conf), "--check"],
                    tuple(range(0, 14)))  # 1-7: differences found; 14+: errors
    return init, check


def watch_peak_rss(integrity: list[str], base: list[str], work: Path,
                   timeout: float = 1800) -> tuple[float, float]:
    """(seconds to READY=1, peak RSS MB of the daemon and its children) of `integrity
    watch` started on the tree: its catch-up scan reads every file."""
    sock_path = work / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    began = time.monotonic()
    proc = subprocess.Popen([*base, "watch"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(work / "watch.log", "wb"),
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)}, cwd=REPO)
    try:
        while True:
            if proc.poll() is not None:
                raise BenchError("integrity watch exited:\n"
                                 + (work / "watch.log").read_text(errors="replace")[-3000:])
            if time.monotonic() - began > timeout:
                raise BenchError("integrity watch never sent READY=1")
            sock.settimeout(1.0)
            try:
                if "READY=1" in sock.recv(4096).decode().splitlines():
                    break
            except TimeoutError:
                continue
        ready = time.monotonic() - began
        peak = 0
        pids = [proc.pid] + children(proc.pid)
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
        return ready, peak * KIB / MB
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def active_entries(db: Path) -> int:
    """Entries of the baseline in force (read-only: the file is not changed)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT entries FROM baseline WHERE state = 'active'")
                   .fetchone()[0])
    finally:
        conn.close()


def db_bytes(db: Path) -> int:
    """The database as it lies on disk: the file, its WAL and shared-memory index."""
    return sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
               if p.exists())


# -- one tree ----------------------------------------------------------------------------------

def bench_tree(name: str, root: Path, integrity: list[str], args: argparse.Namespace,
               errlog: Path, targets: list[Target], figures: dict[str, Any]) -> None:
    """Every measurement of one tree, its targets appended to `targets`."""
    work = Path(tempfile.mkdtemp(prefix=f"integrity-bench-{name}-", dir="/var/tmp"))
    try:
        files, size, entries = count_tree(root)
        print(f"\n== {name}: {root}: {entries:,} entries, {files:,} regular files, "
              f"{size / MB:,.1f} MB", flush=True)
        pipe = 'find "$1" -xdev -type f -print0 | xargs -0 b3sum {}'
        # A live tree (/usr) may change under a command: find and b3sum then exit 1
        # (xargs 123) for an entry gone meanwhile, and still did their work.
        live = (0, 1, 123)
        find = Command("find -printf", ["find", str(root), "-xdev", "-printf", FIND_FMT],
                       live)
        b3_read = Command("b3sum --no-mmap", ["bash", "-c", pipe.format("--no-mmap"), "bash",
                                              str(root)], live)
        b3_mmap = Command("b3sum (mmap, threads)", ["bash", "-c", pipe.format(""), "bash",
                                                    str(root)], live)
        policy = work / "policy.toml"
        policy.write_text(f'[[rule]]\npath = {json.dumps(str(root))}\ncheck = "static"\n')
        db = work / "bench.db"
        base = [*integrity, "--db", f"sqlite:///{db}", "--policy", str(policy), "-q"]
        init = Command("integrity init", [*base, "init", "--force"])
        verify = Command("integrity verify", [*base, "verify"], (0, 1))
        fast = Command("integrity verify --fast", [*base, "verify", "--fast"], (0, 1))
        runs = args.runs
        res: dict[str, Result] = {}
        print("warm cache (a warm-up run of each, then best and median of "
              f"{runs} rounds running each in turn):", flush=True)
        res.update(measure_rounds([find, b3_read, b3_mmap, init, verify, fast], runs,
                                  errlog))
        entries_db = active_entries(db)
        per_entry = db_bytes(db) / max(entries_db, 1)
        print(f"  database: {db_bytes(db) / MB:.1f} MB for {entries_db:,} entries "
              f"({per_entry:.0f} bytes per entry, after {runs + 1} init --force)", flush=True)
        ref = min(res[b3_read.name].best, res[b3_mmap.name].best)
        ref_name = "b3sum"
        cold: dict[str, Result] = {}
        if args.no_cold or os.geteuid() != 0 or name in args.no_cold_trees:
            print("cold cache: skipped", flush=True)
        else:
            print("cold cache (one run each after dropping the caches):", flush=True)
            for cmd in (b3_read, b3_mmap, init):
                cold[cmd.name] = measure(cmd, 1, errlog, cold=True)
        aide: dict[str, Result] = {}
        if not args.no_aide and shutil.which("aide"):
            print("AIDE (sha256, 2 workers; one run each, warm):", flush=True)
            aide_init, aide_check = aide_commands(root, work)
            aide[aide_init.name] = measure(aide_init, 1, errlog)
            os.replace(work / "aide.db.new", work / "aide.db")
            aide[aide_check.name] = measure(aide_check, 1, errlog, warm_up=False)
        watch: tuple[float, float] | None = None
        if name == "1m" and not args.no_watch:
            print("watch: catch-up scan to READY=1, then peak RSS", flush=True)
            watch = watch_peak_rss(integrity, base, work)
            print(f"  ready after {watch[0]:.1f} s, peak RSS {watch[1]:.1f} MB", flush=True)

        def add(label: str, value: float | None, limit: float, **kw: Any) -> None:
            targets.append(Target(name, label, value, limit, **kw))

        add(f"init warm <= {INIT_WARM}x {ref_name}", res[init.name].best / ref, INIT_WARM,
            note=f"{res[init.name].best:.2f} s vs {ref:.2f} s")
        add(f"verify warm <= {VERIFY_WARM}x {ref_name}", res[verify.name].best / ref,
            VERIFY_WARM, note=f"{res[verify.name].best:.2f} s vs {ref:.2f} s")
        add(f"verify --fast <= {FAST_FIND:g}x find", res[fast.name].best / res[find.name].best,
            FAST_FIND, note=f"{res[fast.name].best:.2f} s vs {res[find.name].best:.2f} s")
        if cold:
            cold_ref = min(cold[b3_read.name].best, cold[b3_mmap.name].best)
            add(f"init cold <= {INIT_COLD}x {ref_name}", cold[init.name].best / cold_ref,
                INIT_COLD, note=f"{cold[init.name].best:.2f} s vs {cold_ref:.2f} s")
        else:
            add(f"init cold <= {INIT_COLD}x {ref_name}", None, INIT_COLD, note="not run")
        for cmd in (init, verify, fast):
            add(f"peak RSS of {cmd.name.removeprefix('integrity ')} <= {RSS_MB:g} MB",
                res[cmd.name].rss_kib * KIB / MB, RSS_MB, unit=" MB")
        if watch is not None:
            add(f"peak RSS of watch <= {RSS_MB:g} MB", watch[1], RSS_MB, unit=" MB",
                note=f"READY after a {watch[0]:.1f} s catch-up scan")
        add(f"database <= {DB_BYTES:g} bytes per entry", per_entry, DB_BYTES, unit=" B",
            note=f"{db_bytes(db) / MB:.1f} MB, {entries_db:,} entries")
        if aide:
            ours_init, ours_verify = res[init.name].median, res[verify.name].median
            add(f"AIDE init >= {AIDE_INIT:g}x our init", aide["aide --init"].best / ours_init,
                AIDE_INIT, higher_is_better=True,
                note=f"{aide['aide --init'].best:.2f} s vs {ours_init:.2f} s (our median)")
            add(f"AIDE check >= {AIDE_CHECK:g}x our verify",
                aide["aide --check"].best / ours_verify, AIDE_CHECK, higher_is_better=True,
                note=f"{aide['aide --check'].best:.2f} s vs {ours_verify:.2f} s (our median)")
        figures[name] = {
            "root": str(root), "entries": entries, "files": files, "bytes": size,
            "db_bytes": db_bytes(db), "db_entries": entries_db,
            "watch": {"ready_s": watch[0], "peak_rss_mb": watch[1]} if watch else None,
            **{phase: {n: {"runs": r.runs, "best": r.best, "median": r.median,
                           "peak_rss_kib": r.rss_kib, "exit_codes": sorted(r.codes)}
                       for n, r in results.items()}
               for phase, results in (("warm", res), ("cold", cold), ("aide", aide))}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_etc(integrity: list[str], errlog: Path, targets: list[Target],
              figures: dict[str, Any]) -> None:
    """`integrity verify` of /etc, the whole process (start-up dominates)."""
    work = Path(tempfile.mkdtemp(prefix="integrity-bench-etc-", dir="/var/tmp"))
    try:
        policy = work / "policy.toml"
        policy.write_text('[[rule]]\npath = "/etc"\ncheck = "static"\n')
        base = [*integrity, "--db", f"sqlite:///{work}/etc.db", "--policy", str(policy), "-q"]
        print("\n== /etc", flush=True)
        run_once(Command("integrity init", [*base, "init"]), errlog)
        # What any run of this interpreter pays before it looks at a file, side by side
        # with the verify: the part of the target no change to integrity can reach.
        python = interpreter_of(integrity)
        floor = [Command("python3 -c pass", [python, "-c", "pass"]),
                 Command("import sqlalchemy", [python, "-c", "import sqlalchemy"]),
                 Command("import integrity.cli", [python, "-c", "import integrity.cli"])]
        verify = Command("integrity verify /etc", [*base, "verify"], (0, 1))
        results = measure_rounds([*floor, verify], 10, errlog)
        result = results[verify.name]
        starts = {cmd.name: results[cmd.name].best for cmd in floor}
        targets.append(Target("/etc", f"verify of /etc <= {ETC_SECONDS} s, whole process",
                              result.best, ETC_SECONDS, unit=" s",
                              note=f"median {result.median:.3f} s; python3 alone "
                                   f"{starts['python3 -c pass']:.3f} s, importing "
                                   f"sqlalchemy {starts['import sqlalchemy']:.3f} s"))
        figures["etc"] = {"runs": result.runs, "best": result.best, "median": result.median,
                          "start-up": starts}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_targets(targets: list[Target]) -> None:
    print(f"\n{'tree':<6} {'target':<44} {'measured':>12}  result  note")
    for t in targets:
        value = "-" if t.value is None else (
            f"{t.value:.2f}{t.unit}" if t.unit == "x" else f"{t.value:.3g}{t.unit}")
        print(f"{t.tree:<6} {t.label:<44} {value:>12}  {t.status:<6}  {t.note}")


def parse_args() -> argparse.Namespace:
    """The command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--trees", default="20k,usr,1m", help="comma-separated: 20k, usr, 1m")
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/integrity-bench"),
                    help="where generated trees are kept between runs")
    ap.add_argument("--usr", type=Path, default=Path("/usr"), help="the `usr` tree")
    ap.add_argument("--runs", type=int, default=3, help="timed warm runs per command")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--no-cold-trees", default="", help="skip cold runs on these trees")
    ap.add_argument("--no-aide", action="store_true", help="skip AIDE")
    ap.add_argument("--no-etc", action="store_true", help="skip the /etc start-up run")
    ap.add_argument("--no-watch", action="store_true", help="skip the watcher on the 1M tree")
    ap.add_argument("--python-module", action="store_true", help="run `python3 -m integrity`")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    args.no_cold_trees = set(filter(None, args.no_cold_trees.split(",")))
    return args


def main() -> int:
    """Prepare the trees, measure everything, print the target table."""
    args = parse_args()
    if args.python_module:
        integrity = [sys.executable, "-m", "integrity"]
    else:
        exe = shutil.which("integrity")
        if not exe:
            print("no `integrity` on PATH: use --python-module", file=sys.stderr)
            return 2
        integrity = [exe]
    ensure_tool("b3sum", "b3sum")
    if not args.no_aide and not ensure_tool("aide", "aide"):
        print("aide could not be installed: its targets are skipped", flush=True)
    compile_package(integrity)
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    targets: list[Target] = []
    figures: dict[str, Any] = {}
    errlog = Path(tempfile.mkstemp(prefix="integrity-bench-stderr-")[1])
    try:
        for name in trees:
            if name in GENERATED:
                dirname, params = GENERATED[name]
                root = (args.cache / dirname).resolve()
                prepare_tree(root, params)
                age_tree(root)
            elif name == "usr":
                root = args.usr
            else:
                raise BenchError(f"unknown tree {name!r} (20k, usr, 1m)")
            bench_tree(name, root, integrity, args, errlog, targets, figures)
        if not args.no_etc:
            bench_etc(integrity, errlog, targets, figures)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        errlog.unlink(missing_ok=True)
    print_targets(targets)
    print("\nRatios compare best warm times (AIDE: its one run against our median); "
          "b3sum is the faster of --no-mmap and its default (mmap, threads); peak RSS is "
          "ru_maxrss of the largest single process; MB = 10^6 bytes. Load average now: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "targets": [
            {**t.__dict__, "status": t.status} for t in targets]}, indent=2) + "\n")
    return 1 if any(t.status == "FAIL" for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
