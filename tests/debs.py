"""Small real packages for tests: .debs built with dpkg-deb and installed with dpkg,
.rpms built with rpmbuild.

Real packages, not mocks: what dpkg and rpm record about them is what the tests check.
The tests that install packages into the live system share one lock (`owned`), log
dpkg's actions to files of their own, and purge what they installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

#: One test per machine at a time may own the test packages: two runs at once (a
#: developer's and CI's, or two sessions sharing a machine) would otherwise install
#: and purge the same package under each other.
LOCK = Path(tempfile.gettempdir()) / "integrity-test-pkg.lock"
#: How long to wait for dpkg's own lock, held by an apt or dpkg run outside our lock.
DPKG_LOCK_WAIT = 300.0

#: path -> content, or (content, mode); directories are created 0755.
Files = Mapping[str, "bytes | tuple[bytes, int]"]


def build_deb(workdir: Path, name: str, version: str, files: Files,
              conffiles: Iterable[str] = (), arch: str = "all",
              compression: str = "xz", links: Mapping[str, str] | None = None,
              control: str = "", scripts: Mapping[str, str] | None = None) -> Path:
    """A .deb of `files` and symlinks `links` (absolute paths), built by dpkg-deb.

    Everything is owned root:root; `control` adds fields ("Multi-Arch: same\n");
    `scripts` maps maintainer script names ("postinst", "prerm", ...) to their text.
    No md5sums member is written: dpkg then records md5sums itself at install time,
    as it does for any package that ships none.
    """
    tree = workdir / f"{name}_{version}_{arch}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: integrity tests <root@localhost>\nSection: misc\nPriority: optional\n"
        f"{control}Description: test package for integrity\n")
    conffiles = list(conffiles)
    if conffiles:
        (tree / "DEBIAN" / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    for script, text in (scripts or {}).items():
        (tree / "DEBIAN" / script).write_text(text)
        os.chmod(tree / "DEBIAN" / script, 0o755)
    for path, spec in files.items():
        content, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chmod(target, mode)
    for path, link_target in (links or {}).items():
        link = tree / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(link_target)
    for directory, _, _ in os.walk(tree):
        os.chmod(directory, 0o755)
    deb = workdir / f"{name}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build",
                    str(tree), str(deb)], check=True, capture_output=True)
    return deb


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (what apt's package lists give for a .deb)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packages_stanza(name: str, version: str, arch: str, sha: str) -> str:
    """One stanza of an apt `Packages` index naming a .deb by its SHA-256."""
    return (f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
            f"Filename: pool/main/i/{name}/{name}_{version}_{arch}.deb\n"
            f"Size: 1000\nSHA256: {sha}\nDescription: test package\n\n")


def build_rpm(workdir: Path, name: str, version: str, files: Files) -> Path:
    """A noarch .rpm of `files` (absolute paths), owned root:root, built by rpmbuild."""
    top = workdir / "rpmbuild"
    source = top / "SOURCES" / "tree"
    for path, spec in files.items():
        content, _ = spec if isinstance(spec, tuple) else (spec, 0o644)
        target = source / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    install = "\n".join(
        f"mkdir -p %{{buildroot}}{os.path.dirname(p)}\n"
        f"cp {source}{p} %{{buildroot}}{p}" for p in files)
    listed = "\n".join(
        f"%attr({oct(spec[1] if isinstance(spec, tuple) else 0o644)[2:]},root,root) {p}"
        for p, spec in files.items())
    spec_file = top / f"{name}.spec"
    spec_file.write_text(
        f"Name: {name}\nVersion: {version}\nRelease: 1\nSummary: integrity test\n"
        f"License: MIT\nBuildArch: noarch\n\n%description\ntest package\n\n"
        f"%install\n{install}\n\n%files\n{listed}\n")
    subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "--define",
                    "_build_id_links none", "-bb", str(spec_file)],
                   check=True, capture_output=True)
    return next((top / "RPMS" / "noarch").glob(f"{name}-{version}-1*.rpm"))


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the machine-wide lock on the test packages."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def dpkg_tool(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a dpkg tool (dpkg, dpkg-divert, dpkg-statoverride), waiting while another
    process holds dpkg's lock: other test runs and apt share this machine, and dpkg
    refuses at once (exit 2) instead of waiting. A failure raises with dpkg's stderr."""
    deadline = time.monotonic() + DPKG_LOCK_WAIT
    while True:
        proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL)
        if (proc.returncode == 2 and b"locked by another process" in proc.stderr
                and time.monotonic() < deadline):
            time.sleep(0.2)
            continue
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace').strip()}")
        return proc


def dpkg(log: Path, *args: str) -> None:
    """dpkg ARGS with its log in `log`, never the host's /var/log/dpkg.log; conffile
    questions answered without a terminal."""
    dpkg_tool("dpkg", f"--log={log}", "--force-confdef", "--force-confold", *args)


@contextlib.contextmanager
def owned(package: str, log: Path, paths: Iterable[str],
          scratch: Iterable[str] = ()) -> Iterator[None]:
    """Hold the lock, with `package` purged before (a previous run's leftover) and
    after; afterwards none of `paths` may be left.

    `scratch` are the package's directories that tests also write into by hand: they
    are removed after the purge. The purge itself must remove everything else.
    """
    paths, scratch = list(paths), list(scratch)

    def purge() -> None:
        dpkg(log, "--purge", package)  # a no-op (exit 0) when it is not installed
        for directory in scratch:
            shutil.rmtree(directory, ignore_errors=True)

    with exclusive():
        purge()
        try:
            yield
        finally:
            purge()
            left = [path for path in paths if os.path.lexists(path)]
            assert not left, f"purge left the package's files behind: {left}"


def dpkg_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """dpkg ARGS as they are (its log where the arguments say), waiting for dpkg's lock."""
    return dpkg_tool("dpkg", *args, check=check)
