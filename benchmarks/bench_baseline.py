#!/usr/bin/env python3
"""Time `integrity init` / `verify` against `b3sum` and `find` on a generated tree.

Run as root (cold-cache runs drop the page cache; b3sum may be installed with apt-get):

    python3 benchmarks/bench_baseline.py [--dir DIR] [--files 20000] [--dirs 400]
        [--keep] [--no-cold] [--only-reference] [--python-module] [--json FILE]

Exit status: 0 all targets met (or not measured), 1 a target missed, 2 a command failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".bench-params.json"
KIB, MIB, MB = 1024, 1024 * 1024, 1_000_000
SMALL = (1 * KIB, 16 * KIB)
LARGE = (256 * KIB, 2 * MIB)
BYTES_PER_FILE = (1 << 30) // 20_000  # 1 GiB for the default 20,000 files
FIND_FMT = "%s %T@ %i %m %U %G\\n"
REPO = Path(__file__).resolve().parent.parent
WARM_RUNS = 3
RSS_LIMIT_MB = 200
#: integrity.scan.hasher.RECENT_NS in seconds (not imported: this script's RSS is the floor
#: every child's peak RSS starts from).
FRESH_S = 10


@dataclass(frozen=True)
class Command:
    """A command to time: does it hash (else MB/s means nothing), its good exit codes, and
    the reference its time is compared with."""

    name: str
    argv: list[str]
    hashes: bool
    ok: tuple[int, ...] = (0,)
    ref: str | None = None


@dataclass
class Result:
    """Wall times, exit codes and peak RSS (KiB) of the runs of one command."""

    cmd: Command
    runs: list[float] = field(default_factory=list)
    codes: set[int] = field(default_factory=set)
    rss_kib: int = 0

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


class BenchError(Exception):
    """The benchmark cannot go on: a command failed, or DIR is not ours to overwrite."""


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


def generate(root: Path, params: dict[str, int]) -> None:
    """Write the tree: files spread over `dirs` leaf directories under sqrt(dirs) top ones."""
    rng = random.Random(params["seed"])
    sizes = plan_sizes(params["files"], params["bytes"], rng)
    top = max(1, round(math.sqrt(params["dirs"])))
    leaves = [root / f"d{i % top:03d}" / f"s{i // top:03d}" for i in range(params["dirs"])]
    for leaf in leaves:
        leaf.mkdir(parents=True, exist_ok=True)
    # One random block sliced at random offsets, behind a per-file header, is as costly to
    # hash as fresh random data and much faster to produce.
    block = memoryview(rng.randbytes(LARGE[1] + MIB))
    for i, size in enumerate(sizes):
        header = f"{params['seed']}:{i}\n".encode()[:size]
        offset = rng.randrange(len(block) - size)
        with open(leaves[i % len(leaves)] / f"f{i:06d}.bin", "wb") as out:
            out.write(header)
            out.write(block[offset:offset + size - len(header)])
    os.sync()  # so that writeback does not run during the first timings


def prepare_tree(root: Path, params: dict[str, int]) -> tuple[int, int]:
    """Reuse or (re)generate the tree at root; return (regular files, bytes) in it."""
    marker = root / MARKER
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("complete") and old.get("params") == params:
            print(f"reusing the tree in {root}")
            return count_tree(root)
        shutil.rmtree(root)  # ours (it has a marker), but other parameters or unfinished
    elif root.exists() and any(root.iterdir()):
        raise BenchError(f"{root} is not empty and has no {MARKER}: refusing to overwrite it")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "complete": False}))
    start = time.perf_counter()
    generate(root, params)
    marker.write_text(json.dumps({"params": params, "complete": True}))
    print(f"generated {root} in {time.perf_counter() - start:.1f} s")
    return count_tree(root)


def age_tree(root: Path) -> None:
    """Wait until the newest file of the tree is older than FRESH_S.

    integrity reads a file changed in the last seconds twice, since it may be inside
    a write (hasher.RECENT_NS). A protected tree is not written seconds before its
    baseline, so a freshly generated one is let age before anything is timed; the
    marker is the last file written.
    """
    wait = os.stat(root / MARKER).st_ctime + FRESH_S + 0.5 - time.time()
    if wait > 0:
        print(f"letting the fresh tree age {wait:.1f} s (files changed in the last "
              f"{FRESH_S} s are read twice)")
        time.sleep(wait)


def count_tree(root: Path) -> tuple[int, int]:
    """Count the regular files (the marker included: every command sees it) and their bytes."""
    files = size = 0
    for top, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(top, name)).st_size
    return files, size


def ensure_b3sum() -> None:
    """Install Debian's b3sum if it is not on PATH, updating the package lists if needed."""
    if shutil.which("b3sum"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "b3sum"]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


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
        stderr = errlog.read_text(errors="replace").strip()
        raise BenchError(f"{cmd.name!r} exited {code}: {' '.join(cmd.argv)}\n{stderr}")
    return wall, code, usage.ru_maxrss


def measure(cmds: list[Command], cold: bool, errlog: Path) -> dict[str, Result]:
    """Warm: one warm-up run then WARM_RUNS timed runs each. Cold: one run after a cache drop."""
    results: dict[str, Result] = {}
    for cmd in cmds:
        result = results[cmd.name] = Result(cmd)
        if not cold:
            run_once(cmd, errlog)
        for _ in range(1 if cold else WARM_RUNS):
            if cold:
                drop_caches()
            wall, code, rss = run_once(cmd, errlog)
            result.runs.append(wall)
            result.codes.add(code)
            result.rss_kib = max(result.rss_kib, rss)
    return results


def rss_floor(errlog: Path) -> int:
    """ru_maxrss of `true`: a child's figure starts from this script's RSS at exec time."""
    return run_once(Command("true", ["true"], False), errlog)[2]


def print_table(title: str, results: dict[str, Result], files: int, size: int,
                floor_kib: int) -> None:
    """Print one phase's figures; MB is 10^6 bytes, ratios compare best times."""
    print(f"\n{title}")
    print(f"{'command':<18}{'best s':>9}{'median s':>10}{'files/s':>11}{'MB/s':>9}"
          f"{'peak RSS MB':>13}  ratio")
    for name, res in results.items():
        base = res.cmd.ref
        ratio = f"{res.best / results[base].best:.2f}x {base}" if base in results else ""
        mbs = f"{size / MB / res.best:9.0f}" if res.cmd.hashes else f"{'-':>9}"
        rss = ("<=" if res.rss_kib <= floor_kib else "") + f"{res.rss_kib * KIB / MB:.1f}"
        print(f"{name:<18}{res.best:9.3f}{res.median:10.3f}{files / res.best:11,.0f}{mbs}"
              f"{rss:>13}  {ratio}")
        if res.codes - {0}:
            print(f"{'':<18}note: exit status {sorted(res.codes)}")


RATIO_TARGETS = (  # label, phase, command, reference, limit on the ratio of best times
    ("warm init <= 1.5x b3sum --no-mmap", "warm", "init --force", "b3sum --no-mmap", 1.5),
    ("warm verify <= 1.5x b3sum --no-mmap", "warm", "verify", "b3sum --no-mmap", 1.5),
    ("warm verify --fast <= 3x find", "warm", "verify --fast", "find", 3.0),
    ("cold init <= 1.0x b3sum --no-mmap", "cold", "init --force", "b3sum --no-mmap", 1.0),
)


def check_targets(phases: dict[str, dict[str, Result]]) -> list[dict[str, object]]:
    """Compare the figures with the issue's targets: PASS, MISS or SKIP (not measured)."""
    rows: list[dict[str, object]] = []
    for label, phase, name, base, limit in RATIO_TARGETS:
        res = phases.get(phase, {})
        value = res[name].best / res[base].best if name in res and base in res else None
        rows.append({"target": label, "value": value, "met": value is not None and value <= limit})
    rss = [r.rss_kib * KIB / MB for res in phases.values() for n, r in res.items()
           if n.startswith(("init", "verify"))]
    peak = max(rss) if rss else None
    rows.append({"target": f"integrity peak RSS < {RSS_LIMIT_MB} MB", "value": peak,
                 "met": peak is not None and peak < RSS_LIMIT_MB})
    for row in rows:
        row["status"] = "SKIP" if row["value"] is None else "PASS" if row["met"] else "MISS"
    return rows


def parse_args() -> argparse.Namespace:
    """The command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--dir", type=Path, help="tree location, kept (default: fresh in /var/tmp)")
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--dirs", type=int, default=400, help="leaf directories")
    ap.add_argument("--mb", type=int, help="total MiB (default: 1 GiB per 20,000 files)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the default /var/tmp tree")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--only-reference", action="store_true", help="time b3sum and find only")
    ap.add_argument("--python-module", action="store_true", help="run `python3 -m integrity`")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    return ap.parse_args()


def commands(root: Path, integrity: list[str], work: Path) -> list[Command]:
    """The references, then (if integrity is given) its commands on a policy written to work."""
    pipe = 'find "$1" -type f -print0 | xargs -0 b3sum {}'
    cmds = [Command("find", ["find", str(root), "-xdev", "-printf", FIND_FMT], False),
            Command("b3sum --no-mmap", ["bash", "-c", pipe.format("--no-mmap"), "bash", str(root)],
                    True),
            Command("b3sum (default)", ["bash", "-c", pipe.format(""), "bash", str(root)], True)]
    if integrity:
        policy = work / "policy.toml"
        policy.write_text(f'[[rule]]\npath = {json.dumps(str(root))}\ncheck = "static"\n')
        base = [*integrity, "--db", f"sqlite:///{work}/bench.db", "--policy", str(policy)]
        b3 = "b3sum --no-mmap"
        cmds += [Command("init --force", [*base, "init", "--force"], True, ref=b3),
                 Command("verify", [*base, "verify"], True, (0, 1), b3),
                 Command("verify --fast", [*base, "verify", "--fast"], False, (0, 1), "find")]
    return cmds


def compile_package(integrity: list[str]) -> None:
    """Byte-compile the installed package, as a real install does.

    An editable install under PYTHONDONTWRITEBYTECODE=1 (set on these machines)
    would otherwise recompile every module on every run and time that too.
    """
    python = sys.executable if integrity[0] != sys.executable else integrity[0]
    probe = subprocess.run([python, "-c", "import integrity, os; "
                            "print(os.path.dirname(integrity.__file__))"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        subprocess.run([python, "-m", "compileall", "-q", probe.stdout.strip()],
                       capture_output=True)


def main() -> int:
    """Build or reuse the tree, time everything, print and save the figures."""
    args = parse_args()
    integrity: list[str] = []
    if args.python_module:
        integrity = [sys.executable, "-m", "integrity"]
    elif not args.only_reference:
        exe = shutil.which("integrity")
        if not exe:
            print("no `integrity` on PATH: use --python-module or --only-reference",
                  file=sys.stderr)
            return 2
        integrity = [exe]
    ensure_b3sum()
    if integrity:
        compile_package(integrity)
    total = args.mb * MIB if args.mb else args.files * BYTES_PER_FILE
    params = {"files": args.files, "dirs": args.dirs, "bytes": total, "seed": args.seed}
    root = (args.dir or Path(tempfile.mkdtemp(prefix="integrity-bench-", dir="/var/tmp"))).resolve()
    work = Path(tempfile.mkdtemp(prefix="integrity-bench-work-"))
    errlog = work / "stderr"
    try:
        files, size = prepare_tree(root, params)
        age_tree(root)
        print(f"tree {root}: {files:,} regular files, {size:,} bytes ({size / MB:,.1f} MB), "
              f"{args.dirs} leaf directories")
        cmds = commands(root, integrity, work)
        phases = {"warm": measure(cmds, cold=False, errlog=errlog)}
        floor = rss_floor(errlog)  # taken after the runs: this script's RSS only grows
        print_table(f"warm cache (best of {WARM_RUNS} after a warm-up run)", phases["warm"],
                    files, size, floor)
        if args.no_cold or os.geteuid() != 0:
            print("\ncold cache: skipped (" + ("--no-cold)" if args.no_cold else "needs root)"))
        else:
            phases["cold"] = measure(cmds, cold=True, errlog=errlog)
            floor = rss_floor(errlog)
            print_table("cold cache (one run after dropping the caches)", phases["cold"],
                        files, size, floor)
        print(f"\npeak RSS: ru_maxrss from wait4, the largest single process of the command's"
              f" tree (not a sum); <= marks the {floor * KIB / MB:.1f} MB floor that a child"
              f" inherits from this script's RSS at exec\n")
        targets = check_targets(phases) if integrity else []
        for row in targets:
            value = "-" if row["value"] is None else f"{row['value']:.2f}"
            print(f"{row['status']:<5} {row['target']:<40} measured {value}")
        if args.json:
            figures = {phase: {n: {"runs": r.runs, "best": r.best, "median": r.median,
                                   "peak_rss_kib": r.rss_kib, "exit_codes": sorted(r.codes)}
                               for n, r in res.items()} for phase, res in phases.items()}
            args.json.write_text(json.dumps(
                {"tree": {"root": str(root), "files": files, "bytes": size, "params": params},
                 "rss_floor_kib": floor, **figures, "targets": targets}, indent=2) + "\n")
        return 1 if any(row["status"] == "MISS" for row in targets) else 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"kept the tree: rerun with --dir {root} to reuse it")


if __name__ == "__main__":
    sys.exit(main())
