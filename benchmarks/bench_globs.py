#!/usr/bin/env python3
"""Exclude globs: time per match of integrity's matcher against the plain translation.

    python3 benchmarks/bench_globs.py [--paths 50000] [--limit 10]

Three figures (issue 11, row 17):

1. The backtracking pattern `/tmp/**a**a**a**a**a**a**b` (and two more built the same
   way) over paths that do not match, 10 to 2,000 components deep: microseconds per
   match, which must grow linearly with the path.
2. The plain translation (`*` -> `[^/]*`, `**` -> `.*`, what integrity used before)
   over the same pattern and short paths, each size in a child process stopped after
   --limit seconds: its time multiplies with every few bytes.
3. Ordinary excludes (`*.swp`, `/var/cache/**`, `/etc/*/tmp*`, ...) over --paths real
   paths of this machine (/usr, /etc): nanoseconds per entry, new against plain, the
   cost the walk pays per entry.

Exit status: 0 when the matcher stays linear (figure 1's cost per byte at 2,000
components is at most 3x the one at 100), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrity.policy import Excludes  # noqa: E402

from typing import Any  # noqa: E402

ATTACKS = ("/tmp/**a**a**a**a**a**a**b", "/tmp/**/*a*a*a*a*a*a*b/**", "*a*a*a*a*a*a*b")
ORDINARY = ("*.swp", "*~", ".git", "/var/cache/**", "/etc/*/tmp*", "/usr/share/doc/**",
            "/usr/lib/**/__pycache__", "*.dpkg-[a-z]*")

#: The translation integrity used before (policy/__init__.py's _glob_regex until issue 11).
PLAIN_SOURCE = r'''
import fnmatch, re
def plain(glob, within_name=False):
    out, i = [], 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**", i):
            out.append(".*"); i += 2; continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = i + 1
            if j < len(glob) and glob[j] == "!":
                j += 1
            if j < len(glob) and glob[j] == "]":
                j += 1
            end = glob.find("]", j)
            if end == -1:
                out.append(re.escape(ch))
            else:
                out.append(fnmatch.translate(glob[i:end + 1])[len("(?s:"):-len(")\\Z")])
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "(?:" + "".join(out) + ")"
'''
PLAIN_RUN = PLAIN_SOURCE + r'''
import sys, time
pattern = re.compile("(?s)" + plain(sys.argv[1]))
start = time.process_time()
pattern.fullmatch(sys.argv[2])
print(time.process_time() - start)
'''
_plain: dict[str, Any] = {}
exec(PLAIN_SOURCE, _plain)  # noqa: S102 - our own source, above


def plain_excludes(globs: tuple[str, ...]) -> Excludes:
    """Excludes compiled with the plain translation, for comparison."""
    import integrity.policy as policy

    ours = policy.translate
    policy.translate = _plain["plain"]  # type: ignore[assignment]
    try:
        return Excludes.compile(globs)
    finally:
        policy.translate = ours


def per_match(excludes: Excludes, path: bytes, rounds: int) -> float:
    """Microseconds per match (best of 3)."""
    name = path.rsplit(b"/", 1)[1]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(rounds):
            excludes.match(path, name)
        best = min(best, (time.perf_counter() - start) / rounds)
    return best * 1e6


def linear_figures() -> bool:
    print("1. backtracking patterns over non-matching paths (integrity's matcher)")
    print(f"   {'pattern':<30} {'components':>10} {'bytes':>7} {'us/match':>9} {'ns/byte':>8}")
    linear = True
    for glob in ATTACKS:
        excludes = Excludes.compile((glob,))
        per_byte: dict[int, float] = {}
        for depth in (10, 100, 1000, 2000):
            path = b"/tmp/" + b"/".join([b"aaaaaaaaa"] * depth)
            micro = per_match(excludes, path, max(2000 // depth, 5))
            per_byte[depth] = micro * 1000 / len(path)
            print(f"   {glob:<30} {depth:>10} {len(path):>7} {micro:>9.1f} "
                  f"{per_byte[depth]:>8.1f}")
        # Linear: the cost per byte does not grow with the length (3x for noise).
        linear = linear and per_byte[2000] <= 3 * per_byte[100]
    return linear


def plain_figures(limit: float) -> None:
    print(f"\n2. the plain translation, same pattern (CPU seconds; stopped at {limit:g} s)")
    glob = ATTACKS[0]
    excludes = Excludes.compile((glob,))
    for depth in (2, 4, 6, 8, 10, 12, 16, 20, 30):
        path = "/tmp/" + "/".join(["aaaaaaaaa"] * depth)
        try:
            ran = subprocess.run([sys.executable, "-c", PLAIN_RUN, glob, path],
                                 timeout=limit, capture_output=True, text=True, check=True)
            figure = f"{float(ran.stdout):.3f}"
        except subprocess.TimeoutExpired:
            figure = f"> {limit:g} (stopped)"
        ours = per_match(excludes, path.encode(), 2000)
        print(f"   {depth:>2} components ({len(path):>3} bytes): plain {figure:>16} s   "
              f"integrity {ours:.2f} us")
        if figure.startswith(">"):
            break


def ordinary_figures(count: int) -> None:
    print(f"\n3. ordinary excludes over {count:,} paths of this machine (ns per entry)")
    paths: list[bytes] = []
    for top in (b"/usr", b"/etc"):
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                paths.append(os.path.join(directory, name))
                if len(paths) >= count:
                    break
            if len(paths) >= count:
                break
    pairs = [(p, p.rsplit(b"/", 1)[1]) for p in paths]
    for label, excludes in (("integrity", Excludes.compile(ORDINARY)),
                            ("plain", plain_excludes(ORDINARY))):
        best, hits = float("inf"), 0
        for _ in range(3):
            start = time.perf_counter()
            hits = sum(1 for path, name in pairs if excludes.match(path, name))
            best = min(best, time.perf_counter() - start)
        print(f"   {label:<10} {best * 1e9 / len(pairs):>7.0f} ns/entry ({hits} excluded)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=50_000)
    parser.add_argument("--limit", type=float, default=10.0)
    args = parser.parse_args()
    linear = linear_figures()
    plain_figures(args.limit)
    ordinary_figures(args.paths)
    print("\nlinear: " + ("yes" if linear else "NO"))
    return 0 if linear else 1


if __name__ == "__main__":
    sys.exit(main())
