#!/usr/bin/env python3
"""Instructions per entry of `integrity init`, `verify` and `verify --fast`, by process.

Wall times on a shared 2-core machine move by 20-60% within an hour; instruction counts
do not. This runs the CLI under `valgrind --tool=callgrind` (children traced, so the
hashing workers and the seal reader are counted too) on the first N and the first 2N
top directories of bench_baseline.py's generated 1M tree (made, or reused, in the same
cache), and prints the difference divided by the difference in entries: the per-entry
cost with start-up taken out.

    python3 benchmarks/bench_instructions.py [--dirs 1] [--commands init,verify,fast]

Processes are listed in the order they started: the CLI ("main"), then its children
(the two hashing workers on 2 cores; for a whole-tree verify, the seal reader last).
`integrity` is the one on PATH (install it into a venv of Debian's python3 to measure
what users run); valgrind is installed with apt-get if missing. PYTHONHASHSEED is
fixed and read-ahead stays off at this speed (it switches on only for slow reads).
With `--dirs 1` (10,101 entries a step) a run takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_baseline import GENERATED, age_tree, ensure_tool, prepare_tree

COMMANDS = {"init": ["init", "--force"], "verify": ["verify"], "fast": ["verify", "--fast"]}


def callgrind(integrity: str, work: Path, dirs: int, args: list[str]) -> list[int]:
    """Instructions of each process of one CLI run, the CLI's own first."""
    out = work / f"cg-{dirs}"
    for old in glob.glob(f"{out}.*"):
        os.unlink(old)
    command = ["valgrind", "--tool=callgrind", "--trace-children=yes",
               f"--callgrind-out-file={out}.%p", integrity,
               "--db", f"sqlite:///{work}/n{dirs}.db", "--policy", str(work / f"n{dirs}.toml"),
               "-q", *args]
    result = subprocess.run(command, env={**os.environ, "PYTHONHASHSEED": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode not in (0, 1):
        sys.exit(f"{' '.join(args)} failed: {result.stderr.decode(errors='replace')[-500:]}")
    totals: list[tuple[int, int]] = []
    for name in glob.glob(f"{out}.*"):
        with open(name, encoding="ascii", errors="replace") as handle:
            summary = next((line for line in handle if line.startswith("summary:")), None)
        if summary is not None:
            totals.append((int(name.rsplit(".", 1)[1]), int(summary.split()[1])))
    return [count for _, count in sorted(totals)]


def entries(work: Path, dirs: int) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{work}/n{dirs}.db?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT entries FROM baseline WHERE state = 'active'")
                   .fetchone()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dirs", type=int, default=1, help="top directories in the first step")
    ap.add_argument("--commands", default="init,verify,fast",
                    help="comma-separated: " + ", ".join(COMMANDS))
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/integrity-bench"),
                    help="bench_baseline.py's cache of generated trees")
    args = ap.parse_args()
    integrity = shutil.which("integrity")
    if integrity is None:
        sys.exit("integrity is not on PATH")
    if not ensure_tool("valgrind", "valgrind"):
        sys.exit("valgrind is missing and could not be installed")
    name, params = GENERATED["1m"]
    tree = args.cache / name
    prepare_tree(tree, params)
    age_tree(tree)
    tops = sorted(p for p in tree.iterdir() if p.is_dir())
    if len(tops) < 2 * args.dirs:
        sys.exit(f"{tree}: fewer than {2 * args.dirs} top directories")
    with tempfile.TemporaryDirectory(prefix="integrity-instr-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        steps = (args.dirs, 2 * args.dirs)
        for dirs in steps:
            rules = "".join(f'[[rule]]\npath = "{top}"\ncheck = "static"\n'
                            for top in tops[:dirs])
            (work / f"n{dirs}.toml").write_text(rules)
            subprocess.run([integrity, "--db", f"sqlite:///{work}/n{dirs}.db", "--policy",
                            str(work / f"n{dirs}.toml"), "-q", "init"], check=True,
                           stdout=subprocess.DEVNULL)
        count = entries(work, steps[1]) - entries(work, steps[0])
        print(f"{integrity}: per entry, from {entries(work, steps[0]):,} to "
              f"{entries(work, steps[1]):,} entries (k = 1,000 instructions)")
        for name in args.commands.split(","):
            small, large = (callgrind(integrity, work, dirs, COMMANDS[name]) for dirs in steps)
            if len(small) != len(large):
                sys.exit(f"{name}: {len(small)} processes, then {len(large)}")
            parts = [(b - a) / count / 1000 for a, b in zip(small, large)]
            kinds = ["main"] + [f"child {i}" for i in range(1, len(parts))]
            shown = [f"{kind} {part:.1f}k" for kind, part in zip(kinds, parts)
                     if kind == "main" or abs(part) >= 0.05]
            idle = len(parts) - 1 - (len(shown) - 1)
            note = f" (and {idle} with none per entry: package queries)" if idle else ""
            print(f"  {name:<7} {sum(parts):6.1f}k in all: {', '.join(shown)}{note}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
