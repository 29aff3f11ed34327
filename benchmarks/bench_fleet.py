#!/usr/bin/env python3
"""Measure the fleet against issue 14's targets: 200 hosts x 100k entries in one
PostgreSQL on this machine.

Run as root (the server runs as the `postgres` OS user in a private cluster under
/var/tmp, on a free loopback port; Debian's PostgreSQL is needed, as for the tests):

    python3 benchmarks/bench_fleet.py [--hosts 200] [--entries 100000] [--events 20000]
        [--keep] [--json FILE]

What it does:

1. starts a private cluster with durable settings (fsync, synchronous_commit and
   full_page_writes on; shared_buffers 1GB) and runs `integrity fleet init`;
2. builds one real host: a generated tree of ENTRIES files, `integrity init`, then
   `integrity fleet push` timed as a whole process (the 100k-entry baseline push);
3. loads HOSTS-1 synthetic peers with COPY (the real host's entries, each peer with a
   few differences of its own: content, mode, a missing and an extra path), as the
   admin, straight into the central tables (with a state that says they are alive);
4. changes EVENTS files on the real host, `integrity verify` records them, and times
   the `fleet push` that carries them (event ingest rate);
5. times `integrity fleet drift --group bench --json` over the whole group and checks
   it names the planted differences, and `integrity fleet status --json` for all hosts
   (whole processes, Python start-up included);
6. prints the database size per host, and PASS/FAIL per target.

Exit status: 0 all targets met, 1 one missed, 2 the benchmark could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from pgcluster import Cluster  # noqa: E402

PUSH_LIMIT_S = 10.0
INGEST_MIN = 2000.0
DRIFT_LIMIT_S = 10.0
STATUS_LIMIT_S = 1.0
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
           "shared_buffers": "'1GB'", "max_wal_size": "'8GB'", "checkpoint_timeout": "'30min'",
           "maintenance_work_mem": "'512MB'"}
ENTRY_COLUMNS = ("host_id", "push", "key", "removed", "type", "content", "size", "mode",
                 "uid", "gid", "inode", "nlink", "mtime", "ctime", "link", "xattrs", "dev",
                 "package", "kept")


class BenchError(Exception):
    """A step failed; the message says which."""


def integrity(*args: str, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)
              ) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `python3 -m integrity ARGS` (byte-compiled, as an install would be); wall s."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "integrity", *args], cwd=REPO, text=True,
                            capture_output=True, env={**os.environ, **(env or {})})
    took = time.perf_counter() - began
    if result.returncode not in ok:
        raise BenchError(f"integrity {' '.join(args)} exited {result.returncode}:\n"
                         f"{result.stderr[-2000:]}")
    return took, result


def make_tree(root: Path, files: int) -> None:
    """`files` small files in sqrt(files) directories (a /usr/lib-like spread)."""
    rng = random.Random(14)
    per_dir = max(1, int(files ** 0.5))
    made = 0
    while made < files:
        directory = root / f"pkg{made // per_dir:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(min(per_dir, files - made)):
            (directory / f"lib{index:04d}.so").write_bytes(rng.randbytes(rng.randint(64, 900)))
        made += per_dir


def write_policy(path: Path, tree: Path, url: str, password_file: Path) -> None:
    path.write_text(f'[[rule]]\npath = "{tree}"\ncheck = "static"\nseverity = "high"\n\n'
                    f'[fleet]\nurl = "{url}"\npassword_file = "{password_file}"\n'
                    'group = "bench"\ninterval = "60s"\n')


def load_peers(conninfo: str, real_id: int, peers: int, rng: random.Random
               ) -> dict[str, Any]:
    """Copy the real host's central entries into `peers` synthetic hosts with COPY,
    planting a few differences; returns what was planted."""
    planted: dict[str, Any] = {"content": {}, "mode": {}, "missing": {}, "extra": {}}
    with psycopg.connect(conninfo) as conn:
        conn.execute("SET session_replication_role = replica")  # admin load: no triggers
        template = conn.execute(
            "SELECT key, type, content, size, mode, uid, gid, inode, nlink, mtime, ctime, "
            "link, xattrs, dev, package, kept FROM integrity.entry WHERE host_id = %s "
            "AND superseded IS NULL ORDER BY key", (real_id,)).fetchall()
        files = [i for i, row in enumerate(template) if row[1] == "file"]
        state = conn.execute("SELECT head_digest, head_seq, root, entries, generation FROM "
                             "integrity.host_state WHERE host_id = %s", (real_id,)).fetchone()
        for number in range(1, peers + 1):
            name = f"peer{number:03d}"
            host_id = conn.execute("INSERT INTO integrity.host (name) VALUES (%s) RETURNING id",
                                   (name,)).fetchone()[0]
            odd = {rng.choice(files): "content", rng.choice(files): "mode",
                   rng.choice(files): "missing"}
            rows = []
            for index, row in enumerate(template):
                change = odd.get(index)
                if change == "missing":
                    planted["missing"][name] = row[0]
                    continue
                row = list(row)
                if change == "content":
                    row[2] = rng.randbytes(32)
                    planted["content"][name] = row[0]
                elif change == "mode":
                    row[4] = row[4] | 0o4000
                    planted["mode"][name] = row[0]
                rows.append((host_id, 1, row[0], False, *row[1:]))
            extra = template[files[0]][0] + f".{name}".encode()
            rows.append((host_id, 1, extra, False, "file", rng.randbytes(32), 9, 0o755,
                         0, 0, 1, 1, 0, 0, None, None, 1, None, None))
            planted["extra"][name] = extra
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY integrity.entry ({', '.join(ENTRY_COLUMNS)}) "
                                 "FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            conn.execute(
                "INSERT INTO integrity.baseline (host_id, epoch, push, kind, baseline_id, "
                "generation, root, entries, changes, ledger_seq) VALUES (%s, 1, 1, 'full', "
                "1, %s, %s, %s, %s, 0)", (host_id, state[4], state[2], len(rows), len(rows)))
            conn.execute(
                "INSERT INTO integrity.host_state (host_id, last_seen, interval_s, "
                "reported_group, watcher, head_seq, head_digest, chain_rows, push, "
                "baseline_id, generation, root, entries, central_entries, ledger_seq) "
                "VALUES (%s, now(), 60, 'bench', '{\"alive\": true}', %s, %s, %s, 1, 1, "
                "%s, %s, %s, %s, 0)",
                (host_id, state[1], state[0], state[1], state[4], state[2], len(rows),
                 len(rows)))
            conn.commit()
    return planted


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--keep", action="store_true", help="keep the cluster and tree")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "integrity")],
                   check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir="/var/tmp"))
    cluster = Cluster(Path("/var/tmp"), settings=DURABLE)
    figures: dict[str, Any] = {"hosts": args.hosts, "entries": args.entries,
                               "events": args.events}
    try:
        cluster.start()
        cluster.psql("CREATE DATABASE integrity")
        admin_url = cluster.url("integrity")
        env = {"INTEGRITY_FLEET_URL": admin_url}
        integrity("fleet", "init", env=env)
        password = work / "host.pass"
        integrity("fleet", "enroll", "real", "--password-file", str(password), env=env)
        tree, db, policy = work / "tree", work / "host.db", work / "policy.toml"
        print(f"generating {args.entries} files ...", flush=True)
        make_tree(tree, args.entries - int(args.entries ** 0.5) - 1)
        write_policy(policy, tree, f"postgresql://real@127.0.0.1:{cluster.port}/integrity",
                     password)
        local = ["--db", f"sqlite:///{db}", "--policy", str(policy), "-q"]
        took, _ = integrity(*local, "init")
        print(f"init: {took:.1f} s", flush=True)
        push_s, pushed = integrity(*local, "fleet", "push")
        figures["baseline_push_s"] = push_s
        print(f"baseline push ({pushed.stdout.strip()}): {push_s:.2f} s", flush=True)
        conninfo = (f"host=127.0.0.1 port={cluster.port} dbname=integrity user=postgres "
                    f"password={cluster.password}")
        with psycopg.connect(conninfo) as conn:
            real_id = conn.execute("SELECT id FROM integrity.host WHERE name = 'real'"
                                   ).fetchone()[0]
            figures["entries_pushed"] = conn.execute(
                "SELECT central_entries FROM integrity.host_state WHERE host_id = %s",
                (real_id,)).fetchone()[0]
        began = time.perf_counter()
        planted = load_peers(conninfo, real_id, args.hosts - 1, random.Random(7))
        figures["load_peers_s"] = time.perf_counter() - began
        print(f"loaded {args.hosts - 1} peers with COPY: {figures['load_peers_s']:.0f} s",
              flush=True)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE integrity.entry")
        changed = sorted(tree.rglob("*.so"))[:args.events]
        for path in changed:
            path.write_bytes(b"changed " + path.name.encode())
        time.sleep(1)
        took, _ = integrity(*local, "verify", ok=(1,))
        print(f"verify recording {len(changed)} changes: {took:.1f} s", flush=True)
        ingest_s, pushed = integrity(*local, "fleet", "push")
        figures["ingest_push_s"] = ingest_s
        figures["ingest_rate"] = len(changed) / ingest_s
        print(f"event push ({pushed.stdout.strip()}): {ingest_s:.2f} s, "
              f"{figures['ingest_rate']:.0f} events/s", flush=True)
        drift_s, drifted = integrity("fleet", "drift", "--group", "bench", "--json", env=env,
                                     ok=(1,))
        items = json.loads(drifted.stdout)
        figures["drift_s"] = drift_s
        found = {(o["host"], i["path"]) for i in items for o in i["outliers"]}
        expected = {(h, k.replace(b"\0", b"/").decode()) for kind in planted.values()
                    for h, k in kind.items()}
        figures["drift_found_planted"] = len(expected & found)
        figures["drift_planted"] = len(expected)
        print(f"fleet drift over {args.hosts} hosts: {drift_s:.2f} s, {len(items)} paths, "
              f"{len(expected & found)}/{len(expected)} planted differences named", flush=True)
        status_runs = [integrity("fleet", "status", "--json", env=env, ok=(0, 1))[0]
                       for _ in range(3)]
        figures["status_s"] = min(status_runs)
        print(f"fleet status for {args.hosts} hosts: best {min(status_runs):.2f} s "
              f"(of {', '.join(f'{t:.2f}' for t in status_runs)})", flush=True)
        with psycopg.connect(conninfo) as conn:
            size = conn.execute("SELECT pg_database_size('integrity')").fetchone()[0]
            tables = conn.execute(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN "
                "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'integrity' "
                "AND c.relkind = 'r' ORDER BY 2 DESC LIMIT 4").fetchall()
        figures["db_bytes"] = size
        figures["bytes_per_host"] = size / args.hosts
        figures["bytes_per_entry"] = size / (args.hosts * args.entries)
        print(f"database: {size / 1e9:.2f} GB, {size / args.hosts / 1e6:.1f} MB per host, "
              f"{size / (args.hosts * args.entries):.0f} bytes per entry; largest: "
              + ", ".join(f"{name} {b / 1e9:.2f} GB" for name, b in tables), flush=True)
    except BenchError as exc:
        print(f"bench_fleet: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept: cluster in {cluster.base} (port {cluster.port}), tree in {work}")
        else:
            cluster.destroy()
            shutil.rmtree(work, ignore_errors=True)
    targets = [
        ("100k-entry baseline push", figures["baseline_push_s"] <= PUSH_LIMIT_S,
         f"{figures['baseline_push_s']:.2f} s <= {PUSH_LIMIT_S} s"),
        ("event ingest", figures["ingest_rate"] >= INGEST_MIN,
         f"{figures['ingest_rate']:.0f}/s >= {INGEST_MIN:.0f}/s"),
        (f"fleet drift over {args.hosts} hosts", figures["drift_s"] <= DRIFT_LIMIT_S
         and figures["drift_found_planted"] == figures["drift_planted"],
         f"{figures['drift_s']:.2f} s <= {DRIFT_LIMIT_S} s, every planted difference"),
        (f"fleet status for {args.hosts} hosts", figures["status_s"] <= STATUS_LIMIT_S,
         f"{figures['status_s']:.2f} s <= {STATUS_LIMIT_S} s"),
    ]
    print()
    for name, ok, detail in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    figures["targets"] = {name: ok for name, ok, _ in targets}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0 if all(ok for _, ok, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
