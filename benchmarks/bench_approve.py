#!/usr/bin/env python3
"""Time `integrity approve --package-updates` after real package runs, and count evidence.

Run as root on a Debian host (it installs, upgrades and purges a package it builds, and
reinstalls three real ones with apt-get):

    python3 benchmarks/bench_approve.py [--modules 1200] [--data 1100] [--small]
        [--no-usr-lib] [--json FILE]

Two runs against one baseline (the shipped default policy plus /usr/lib, as issue 12
measured it):

1. **reinstall**: `apt-get install --reinstall python3-jwt libgdk-pixbuf-2.0-0
   libglib2.0-0`, `verify`, then `approve --package-updates` through the CLI.
2. **synthetic**: a package built here with dpkg-deb (`--modules` Python modules that
   its postinst byte-compiles with py3compile, `--data` data files, an
   update-alternatives group with a slave) upgraded from 1.0 to 1.1 with dpkg, `verify`,
   then the same approval through the core API with apt's archive cache and package
   lists pointed at a private copy that holds the 1.1 `.deb` (so its files are checked
   against the verified `.deb`, as a real upgrade's are), and once more through the
   CLI from the same verified database (dpkg's md5sums as evidence).

Each run prints the wall time, the changes, and how many files each evidence kind
vouched for, and what was left open. Exit status: 0 when every run leaves nothing open
and each synthetic approval takes at most TARGET_S (10 s), 1 otherwise, 2 when it could
not run. Other work on the machine shows: a file someone else adds to /usr/lib meanwhile
is listed as left open (use --no-usr-lib to protect only the packages' own trees).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.debs import build_deb, dpkg, packages_stanza, sha256  # noqa: E402

PKG = "integrity-bench-synth"
PYDIR = "/usr/lib/python3/dist-packages/integrity_bench_synth"
DATADIR = f"/usr/lib/{PKG}"
ALT_LINK = f"/usr/bin/{PKG}"
ALT_MAN = f"/usr/share/man/man1/{PKG}.1.gz"
REINSTALL = ["python3-jwt", "libgdk-pixbuf-2.0-0", "libglib2.0-0"]
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=120"]
DPKG_OPTS = ("--force-confdef", "--force-confold")
#: issue 12: approving ~3,600 changes takes at most this long.
TARGET_S = 10.0
MODULES_PER_PACKAGE = 40


class BenchError(Exception):
    """The benchmark cannot go on."""


def run(argv: list[str], ok: tuple[int, ...] = (0,), **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    if proc.returncode not in ok:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def dpkg_run(*args: str, ok: tuple[int, ...] = (0,)) -> None:
    """dpkg, waiting for its lock like apt's DPkg::Lock::Timeout."""
    proc = dpkg(*DPKG_OPTS, *args, check=False)
    if proc.returncode not in ok:
        raise BenchError(f"dpkg {' '.join(args)} exited {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")


def synthetic_files(version: str, modules: int, data: int) -> dict[str, bytes | tuple[bytes, int]]:
    """The package's files: Python modules in subpackages, data files, the tool."""
    files: dict[str, bytes | tuple[bytes, int]] = {}
    packages = max(1, (modules + MODULES_PER_PACKAGE - 1) // MODULES_PER_PACKAGE)
    files[f"{PYDIR}/__init__.py"] = f'VERSION = "{version}"\n'.encode()
    for i in range(modules):
        sub = f"{PYDIR}/p{i % packages:03d}"
        files.setdefault(f"{sub}/__init__.py", f'"""part {i % packages}"""\n'.encode())
        body = "".join(f"def f{j}(x):\n    return x * {j} + {i}  # {version}\n\n"
                       for j in range(12))
        files[f"{sub}/m{i:05d}.py"] = (f'"""module {i}, version {version}"""\n'
                                       f"import os\n\nNAME = 'm{i}'\n\n{body}").encode()
    for i in range(data):
        files[f"{DATADIR}/data/d{i % 30:02d}/f{i:05d}.dat"] = (
            f"{version}:{i}\n".encode() * (1 + i % 200))
    files[f"{DATADIR}/bin/tool-{version}"] = (f"#!/bin/sh\necho {version}\n".encode(), 0o755)
    files[f"/usr/share/man/man1/{PKG}-{version}.1.gz"] = f"man {version}\n".encode()
    return files


def synthetic_scripts(version: str) -> dict[str, str]:
    """Maintainer scripts as dh_python3 and a package with alternatives write them."""
    tool = f"{DATADIR}/bin/tool-{version}"
    man = f"/usr/share/man/man1/{PKG}-{version}.1.gz"
    return {
        "postinst": "#!/bin/sh\nset -e\n"
                    f"if command -v py3compile >/dev/null 2>&1; then py3compile -p {PKG}; fi\n"
                    f"update-alternatives --install {ALT_LINK} {PKG} {tool} 50 "
                    f"--slave {ALT_MAN} {PKG}.1.gz {man}\n",
        "prerm": "#!/bin/sh\nset -e\n"
                 f"if command -v py3clean >/dev/null 2>&1; then py3clean -p {PKG}; fi\n"
                 f'if [ "$1" != failed-upgrade ]; then '
                 f"update-alternatives --remove {PKG} {tool}; fi\n",
    }


@contextlib.contextmanager
def synthetic_package(work: Path, modules: int, data: int) -> Iterator[dict[str, Path]]:
    """Build 1.0 and 1.1; purge the package (and its alternatives) at the end."""
    debs = {v: build_deb(work, PKG, v, synthetic_files(v, modules, data),
                         scripts=synthetic_scripts(v)) for v in ("1.0", "1.1")}
    dpkg_run("--purge", PKG)
    try:
        yield debs
    finally:
        dpkg_run("--purge", PKG, ok=(0, 1))


def private_apt(work: Path, deb: Path) -> tuple[Path, Path]:
    """An archive cache holding `deb` and a package list naming its SHA-256."""
    archives, lists = work / "archives", work / "lists"
    archives.mkdir()
    lists.mkdir()
    shutil.copy(deb, archives / deb.name)
    (lists / "bench_dists_main_binary-all_Packages").write_text(
        packages_stanza(PKG, "1.1", "all", sha256(deb)))
    return archives, lists


def write_policy(work: Path, usr_lib: bool) -> Path:
    """The shipped default policy, plus /usr/lib (or only the synthetic package's trees)."""
    text = (REPO / "policies" / "default.toml").read_text()
    text = text.replace("/var/log/integrity/alerts.jsonl", str(work / "alerts.jsonl"))
    trees = ["/usr/lib"] if usr_lib else [PYDIR, DATADIR, "/usr/lib/python3/dist-packages/jwt",
                                          "/usr/lib/x86_64-linux-gnu/gdk-pixbuf-2.0",
                                          "/usr/lib/x86_64-linux-gnu/gio"]
    extra = "".join(f'[[rule]]\npath = "{t}"\ncheck = "static"\nseverity = "high"\n\n'
                    for t in trees)
    policy = work / "policy.toml"
    policy.write_text(text.replace("[schedule]", extra + "[schedule]", 1))
    return policy


def integrity(work: Path, policy: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    env = dict(os.environ, INTEGRITY_DB=f"sqlite:///{work / 'bench.db'}",
               INTEGRITY_POLICY=str(policy))
    return run([sys.executable, "-m", "integrity", "-q", *args], ok=ok, env=env,
               cwd=REPO).stdout


def summarize(name: str, seconds: float, changes: int, doc: dict[str, Any]) -> dict[str, Any]:
    """Print one run's figures; return them for --json."""
    kinds = collections.Counter(a["evidence"] or "(none)" for a in doc["approved"])
    reasons = collections.Counter(item["reason"] for item in doc["left_open"])
    print(f"\n{name}: {changes:,} changes, approve --package-updates {seconds:.2f} s")
    print(f"  vouched for: {len(doc['approved']):,}")
    for kind, count in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {count:6,}  {kind}")
    print(f"  left open: {len(doc['left_open']):,}")
    for reason, count in reasons.most_common(8):
        print(f"    {count:6,}  {reason}")
        for item in [i for i in doc["left_open"] if i["reason"] == reason][:3]:
            print(f"            {item['kind']} {item['path']}")
    return {"seconds": round(seconds, 3), "changes": changes, "evidence": dict(kinds),
            "left_open": len(doc["left_open"]), "reasons": dict(reasons)}


def verify_count(work: Path, policy: Path) -> int:
    doc = json.loads(integrity(work, policy, "verify", "--json", ok=(0, 1)))
    return len(doc["changes"])


def approver_api() -> Any:
    """The Approver class."""
    from integrity.ops.approve import Approver
    return Approver


def approve_in_process(work: Path, policy: Path, archives: Path, lists: Path) -> tuple[float, dict[str, Any]]:
    """`approve --package-updates` through the core API, with a private apt cache."""
    from integrity.packages import PackageManagers
    from integrity.policy import load as load_policy
    from integrity.report import approval_json
    from integrity.store import Store

    loaded = load_policy(str(policy))
    store = Store(f"sqlite:///{work / 'bench.db'}")
    try:
        start = time.perf_counter()
        approver = approver_api()(store, loaded, reason="benchmark")
        outcome = approver.package_updates(PackageManagers(
            apt_archives=str(archives), apt_lists=str(lists)))
        seconds = time.perf_counter() - start
    finally:
        store.close()
    return seconds, approval_json(outcome)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", type=int, default=1200,
                        help="Python modules in the synthetic package (default 1200)")
    parser.add_argument("--data", type=int, default=1100,
                        help="data files in the synthetic package (default 1100)")
    parser.add_argument("--no-usr-lib", action="store_true",
                        help="protect only the packages' own trees, not all of /usr/lib")
    parser.add_argument("--json", type=Path, help="also write the figures to FILE")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0 or not shutil.which("dpkg") or not shutil.which("py3compile"):
        print("needs root, dpkg and py3compile (python3 from Debian)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="integrity-bench-approve-"))
    figures: dict[str, Any] = {}
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(APT + ["install", *REINSTALL], env=env)
        with synthetic_package(work, args.modules, args.data) as debs:
            dpkg_run("-i", str(debs["1.0"]))
            policy = write_policy(work, not args.no_usr_lib)
            start = time.perf_counter()
            out = integrity(work, policy, "init")
            print(f"init: {out.splitlines()[0] if out else ''} "
                  f"({time.perf_counter() - start:.1f} s)")

            run(APT + ["install", "--reinstall", *REINSTALL], env=env)
            changes = verify_count(work, policy)
            start = time.perf_counter()
            doc = json.loads(integrity(work, policy, "approve", "--package-updates", "--json"))
            figures["reinstall"] = summarize(
                "reinstall (" + " ".join(REINSTALL) + ", CLI)",
                time.perf_counter() - start, changes, doc)

            dpkg_run("-i", str(debs["1.1"]))
            archives, lists = private_apt(work, debs["1.1"])
            changes = verify_count(work, policy)
            shutil.copy(work / "bench.db", work / "verified.db")
            seconds, doc = approve_in_process(work, policy, archives, lists)
            figures["synthetic"] = summarize(
                f"synthetic upgrade ({args.modules} modules, {args.data} data files; API, "
                ".deb verified)", seconds, changes, doc)
            # The same approval again through the CLI (a process of its own, dpkg's
            # md5sums as evidence: the .deb is not in apt's own cache).
            shutil.copy(work / "verified.db", work / "bench.db")
            start = time.perf_counter()
            doc = json.loads(integrity(work, policy, "approve", "--package-updates", "--json"))
            figures["synthetic-cli"] = summarize(
                "synthetic upgrade (CLI, dpkg's md5sums)", time.perf_counter() - start,
                changes, doc)
    except BenchError as exc:
        print(f"bench_approve: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    missed = [f"{name} left {fig['left_open']} open" for name, fig in figures.items()
              if fig["left_open"]]
    missed += [f"{name} took {fig['seconds']} s > {TARGET_S} s"
               for name, fig in figures.items()
               if name.startswith("synthetic") and fig["seconds"] > TARGET_S]
    print("\n" + ("targets met" if not missed else "missed: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
