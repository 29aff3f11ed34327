#!/usr/bin/env python3
"""`verify` and `status` of a host with a long history: time and peak RSS as the event
chain grows.

Every `verify` and `status` checks the whole event chain against the tables it covers
(integrity/store/ledger.py, `Ledger.check`), so their cost grows with the history a
host keeps (`[retention]` is off by default). This builds, once, databases with a
given number of approved changes through the real CLI (a tree of 20,000 small files:
`init`, then rounds of touching every file, `verify`, `approve` of the tree: each
round adds 20,000 events and about 40,000 chain records), then times `verify` of the
tree and `status` on each, and checks SPEC's peak RSS bound (150 MB) there too.

    python3 benchmarks/bench_history.py                     # 0, 20k, 100k events
    python3 benchmarks/bench_history.py --rounds 0 1 5 10   # 0 to 200k events

Databases are cached in --cache (default /var/tmp/integrity-bench/history).
Exit status: 0 the RSS bound held, 1 it did not, 2 a command failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baseline import (KIB, MB, RSS_MB, BenchError, Command, Target,  # noqa: E402
                            measure, print_targets, run_once)

FILES, DIRS = 20_000, 100


def build(cache: Path, rounds: int, integrity: list[str], errlog: Path) -> list[str]:
    """The CLI's base arguments for a database with `rounds` rounds of approved
    changes of the tree, built unless cached."""
    # A tree per database: a round's changes must not show in another's verify (which
    # would record them, and so change the history being measured).
    tree = cache / f"tree-{rounds}"
    db = cache / f"rounds-{rounds}.db"
    marker = db.with_suffix(".done")
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        for d in range(DIRS):
            (tree / f"d{d}").mkdir(parents=True)
            for f in range(FILES // DIRS):
                (tree / f"d{d}" / f"f{f}").write_bytes(b"x")
    policy = cache / f"policy-{rounds}.toml"
    policy.write_text(f'[[rule]]\npath = "{tree}"\ncheck = "static"\n')
    base = [*integrity, "--db", f"sqlite:///{db}", "--policy", str(policy), "-q"]
    if marker.exists():
        return base
    for leftover in cache.glob(db.name + "*"):
        leftover.unlink()
    print(f"building {db.name}: init, then {rounds} rounds of {FILES:,} changes approved",
          flush=True)
    run_once(Command("init", [*base, "init"]), errlog)
    for n in range(rounds):
        subprocess.run(["find", str(tree), "-type", "f", "-exec", "touch", "{}", "+"],
                       check=True)
        run_once(Command("verify", [*base, "verify"], (0, 1)), errlog)
        run_once(Command("approve", [*base, "approve", str(tree), "--reason",
                                     f"round {n}"]), errlog)
    marker.write_text("")
    return base


def counts(base: list[str]) -> tuple[int, int]:
    """(events, chain records) of the database a base command line names."""
    db = base[base.index("--db") + 1].split(":///", 1)[1]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        events = conn.execute("SELECT count(*) FROM event").fetchone()[0]
        records = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    return events, records


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 5])
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/integrity-bench/history"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python-module", action="store_true",
                    help="run `python3 -m integrity` instead of `integrity` from PATH")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    integrity = ([sys.executable, "-m", "integrity"] if args.python_module
                 else [shutil.which("integrity") or "integrity"])
    args.cache.mkdir(parents=True, exist_ok=True)
    errlog = args.cache / "stderr.log"
    targets: list[Target] = []
    figures: dict[str, object] = {}
    try:
        for rounds in sorted(set(args.rounds)):
            base = build(args.cache, rounds, integrity, errlog)
            events, records = counts(base)
            print(f"\n== {events:,} events, {records:,} chain records", flush=True)
            # Exit 0 only: a verify that found changes would record them (and a status
            # that is not healthy means the history is not what was built).
            results = {name: measure(Command(f"integrity {name}", [*base, name]),
                                     args.runs, errlog) for name in ("verify", "status")}
            for name, result in results.items():
                mb = result.rss_kib * KIB / MB
                targets.append(Target(f"{events // 1000}k", f"peak RSS of {name} <= "
                                      f"{RSS_MB:g} MB", mb, RSS_MB, unit=" MB",
                                      note=f"{result.best:.2f} s (median "
                                           f"{result.median:.2f} s)"))
                figures[f"{events}:{name}"] = {"runs": result.runs, "rss_mb": mb,
                                               "records": records}
    except BenchError as exc:
        print(f"bench_history: {exc}", file=sys.stderr)
        return 2
    print_targets(targets)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"Load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if any(t.status == "FAIL" for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
