"""Derived files, for real: real packages reinstalled with apt, real maintainer scripts,
triggers and tools, then `approve --package-updates`.

What a package run makes that no package ships (bytecode py3compile writes, caches
triggers regenerate) must be vouched for by making it again, and what an intruder
plants beside it (a .pyc with a payload, a .pyc of a source no package vouches for)
must stay open with the reason. These tests install, reinstall and purge packages:
they take tests/test_packages.py's lock, so two runs on one machine never install
under each other, and use apt with a lock timeout for the rest of the machine.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import py_compile
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aptrepo import tool_files
from conftest import Cli
from integrity.packages import PackageManagers
from integrity.packages.common import Verdict
from integrity.packages.derived import Change, rejudge
from integrity.packages.derived.common import Context
from integrity.packages.derived.sandbox import ToolError
from integrity.record import FileRecord
from debs import build_deb, dpkg_cmd, exclusive

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg") is None or shutil.which("apt-get") is None,
    reason="installs real packages: needs root, dpkg and apt")
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=120"]
PY = "/usr/bin/python3.11"


def apt(*args: str) -> None:
    subprocess.run([*APT, *args], check=True, capture_output=True, stdin=subprocess.DEVNULL,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def policy(tmp_path: Path, rules: list[str], check: str = "static") -> Cli:
    """A CLI over rules for exactly these paths."""
    text = "".join(f'[[rule]]\npath = "{p}"\ncheck = "{check}"\nseverity = "high"\n\n'
                   for p in sorted(set(rules)))
    (tmp_path / "policy.toml").write_text(text)
    return Cli(tmp_path / "state" / "integrity.db", tmp_path / "policy.toml")


def changes_of(run: Cli) -> dict[str, dict[str, Any]]:
    result = run("verify", "--json")
    assert result.exit_code in (0, 1), result.stdout + result.stderr
    return {c["path"]: c for c in json.loads(result.stdout)["changes"]}


def approve(run: Cli) -> tuple[dict[str, str | None], dict[str, str]]:
    """approve --package-updates: (path -> evidence of what it approved,
    path -> reason of what it left open)."""
    result = run("approve", "--package-updates", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    return ({a["path"]: a["evidence"] for a in doc["approved"]},
            {item["path"]: item["reason"] for item in doc["left_open"]})


def listed(*packages: str) -> list[str]:
    out = subprocess.run(["dpkg", "-L", *packages], check=True, capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if line.startswith("/")]


def quiet_dpkg_log() -> None:
    """Removal evidence counts whole seconds of /var/log/dpkg.log before the baseline."""
    with contextlib.suppress(OSError):
        while time.time() - os.stat("/var/log/dpkg.log").st_mtime < 2.1:
            time.sleep(0.2)


# -- real reinstalls ----------------------------------------------------------------

@needs_root
def test_reinstalling_python_and_glib_packages_leaves_nothing_open(tmp_path: Path) -> None:
    """The issue's repeatable case: py3compile rewrites python3-jwt's bytecode, the
    triggers rewrite gdk-pixbuf's loaders.cache, gio's giomodule.cache, GLib's compiled
    schemas and /etc/ld.so.cache. All of it is made again and matches."""
    packages = ["python3-jwt", "libgdk-pixbuf-2.0-0", "libglib2.0-0"]
    files = listed(*packages)
    jwt = next(os.path.dirname(p) for p in files if p.endswith("/jwt/__init__.py"))
    tool = next(p for p in files if p.endswith("/gdk-pixbuf-query-loaders"))
    modules = next(p for p in files if p.endswith("/gio/modules"))
    rules = [jwt, os.path.dirname(tool), os.path.dirname(modules),
             "/usr/share/glib-2.0/schemas", "/etc/ld.so.cache"]
    rules += [p for p in files if p.startswith("/usr/lib/") and not os.path.isdir(p)]
    # apt's keyrings, pinned by the baseline: the .debs apt keeps state the libraries'
    # symlink targets once their lists verify with them.
    rules += [p for p in ("/usr/share/keyrings", "/etc/apt/trusted.gpg.d")
              if os.path.isdir(p)]
    # And the tools those lists and .debs are read with (gpgv, dpkg-deb, their
    # libraries), which the default policy's /usr/bin and /usr/lib hold.
    rules += [p for p in tool_files() if p not in rules]
    run = policy(tmp_path, rules)
    with exclusive():
        assert run("init").exit_code == 0
        apt("install", "--reinstall", *packages)
        changed = changes_of(run)
        approved, left = approve(run)
    pycs = [p for p in changed if p.endswith(".pyc")]
    caches = [os.path.join(os.path.dirname(tool), "2.10.0", "loaders.cache"),
              os.path.join(modules, "giomodule.cache"), "/etc/ld.so.cache"]
    assert len(pycs) >= 10 and all(c in changed for c in caches), sorted(changed)
    assert left == {}
    assert {approved[p] for p in pycs} == {"derived:python-bytecode"}
    assert approved[os.path.join(jwt, "__pycache__")] == "derived:python-bytecode"
    assert approved[caches[0]] == "derived:gdk-pixbuf-query-loaders"
    assert approved[caches[1]] == "derived:gio-querymodules"
    assert approved["/etc/ld.so.cache"] == "derived:ldconfig"
    assert approved["/usr/share/glib-2.0/schemas/gschemas.compiled"] == \
        "derived:glib-compile-schemas"
    assert set(approved) == set(changed)
    assert run("verify").exit_code == 0


@needs_root
def test_reinstalling_packages_with_data_caches_leaves_nothing_open(tmp_path: Path) -> None:
    """update-mime-database, gtk-update-icon-cache and fc-cache rewrite their trees."""
    run = policy(tmp_path, ["/usr/share/mime", "/usr/share/icons/hicolor",
                            "/var/cache/fontconfig"])
    with exclusive():
        assert run("init").exit_code == 0
        apt("install", "--reinstall", "shared-mime-info", "hicolor-icon-theme", "fontconfig")
        changed = changes_of(run)
        approved, left = approve(run)
    assert left == {}
    assert approved["/usr/share/mime/mime.cache"] == "derived:update-mime-database"
    assert approved["/usr/share/icons/hicolor/icon-theme.cache"] == \
        "derived:gtk-update-icon-cache"
    fonts = [p for p in changed if p.startswith("/var/cache/fontconfig/")
             and p.endswith(".cache-8")]
    assert fonts and {approved[p] for p in fonts} == {"derived:fc-cache"}


@needs_root
def test_reinstalling_ca_certificates(tmp_path: Path) -> None:
    """The links and bundle update-ca-certificates writes are made again from the
    package certificates; a certificate someone dropped into /usr/local keeps the
    bundle open, saying so."""
    local = sorted(str(p) for p in Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    run = policy(tmp_path, ["/etc/ssl/certs"])
    with exclusive():
        assert run("init").exit_code == 0
        apt("install", "--reinstall", "ca-certificates")
        changed = changes_of(run)
        approved, left = approve(run)
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert bundle in changed
    for path, reason in left.items():
        assert local, f"{path} left open without local certificates: {reason}"
        assert f"no package ships ({local[0]}" in reason
    if local:
        assert bundle in left, left
    else:
        assert left == {} and approved[bundle] == "derived:update-ca-certificates"
    shipped = set(listed("ca-certificates"))
    assert all(e == "derived:update-ca-certificates" for p, e in approved.items()
               if p.startswith("/etc/ssl/certs/") and p not in shipped)


# -- bytecode: planted and tampered -----------------------------------------------------

PYPKG = "integrity-test-pyc"
PYDIR = "/usr/lib/python3/dist-packages/integrity_test_pyc"
MARKER = "/tmp/integrity-test-pyc-imported"


def _py_files(version: str) -> dict[str, bytes | tuple[bytes, int]]:
    # Importing `fine` would leave a marker: making its bytecode must never import it.
    return {f"{PYDIR}/__init__.py": f'VERSION = "{version}"\n'.encode(),
            f"{PYDIR}/fine.py": f"open({MARKER!r}, 'w').close()\nV = {version!r}\n".encode(),
            f"{PYDIR}/tampered.py": f"def f():\n    return {version!r}\n".encode(),
            f"{PYDIR}/other.py": f"def g():\n    return 'other {version}'\n".encode(),
            f"{PYDIR}/payload.py": f"def h():\n    return 'payload {version}'\n".encode()}


_PY_SCRIPTS = {"postinst": f"#!/bin/sh\nset -e\npy3compile -p {PYPKG}\n",
               "prerm": f"#!/bin/sh\nset -e\npy3clean -p {PYPKG}\n"}


@pytest.fixture
def pyc_package(tmp_path: Path) -> Iterator[dict[str, Path]]:
    debs = {v: build_deb(tmp_path, PYPKG, v, _py_files(v), scripts=_PY_SCRIPTS)
            for v in ("1.0", "1.1")}
    log = tmp_path / "dpkg.log"
    with exclusive():
        dpkg_cmd(f"--log={log}", "--purge", PYPKG, check=False)
        try:
            yield debs
        finally:
            dpkg_cmd(f"--log={log}", "--purge", PYPKG, check=False)
            shutil.rmtree(PYDIR, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER)


def _compile_to(source: str, target: str, dfile: str) -> None:
    """Genuine bytecode of other source text, written where a .pyc is looked for."""
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "x.py")
        Path(src).write_text(source)
        py_compile.compile(src, cfile=target, dfile=dfile, doraise=True)
    os.chmod(target, 0o644)


@needs_root
def test_planted_bytecode_stays_open_with_reasons(tmp_path: Path,
                                                 pyc_package: dict[str, Path]) -> None:
    log = tmp_path / "dpkg.log"
    dpkg_cmd(f"--log={log}", "-i", str(pyc_package["1.0"]))
    run = policy(tmp_path, [PYDIR])
    assert run("init").exit_code == 0
    dpkg_cmd(f"--log={log}", "-i", str(pyc_package["1.1"]))
    cache = f"{PYDIR}/__pycache__"
    pyc = {name: f"{cache}/{name}.cpython-311.pyc"
           for name in ("__init__", "fine", "tampered", "other", "payload", "planted")}
    # Same name, different code: genuine bytecode of another source.
    _compile_to("import os\nos.system('id')\n", pyc["other"], f"{PYDIR}/other.py")
    # The package's own header (right magic, source mtime and size), then a payload.
    header = Path(pyc["payload"]).read_bytes()[:16]
    Path(pyc["payload"]).write_bytes(header + marshal.dumps(compile(
        "import os\nos.system('id')\n", f"{PYDIR}/payload.py", "exec")))
    # A module no package ships, with bytecode compiled properly from it.
    Path(f"{PYDIR}/planted.py").write_text("def evil():\n    pass\n")
    _compile_to("def evil():\n    pass\n", pyc["planted"], f"{PYDIR}/planted.py")
    # A package's source edited, and its bytecode compiled from the edit.
    Path(f"{PYDIR}/tampered.py").write_text("def f():\n    return 'evil'\n")
    _compile_to("def f():\n    return 'evil'\n", pyc["tampered"], f"{PYDIR}/tampered.py")

    changes = changes_of(run)
    assert {pyc[n] for n in pyc} <= set(changes)
    approved, left = approve(run)
    assert approved[pyc["fine"]] == approved[pyc["__init__"]] == "derived:python-bytecode"
    assert approved[cache] == "derived:python-bytecode"
    assert not os.path.exists(MARKER), "making bytecode imported the source"
    for name in ("other", "payload"):
        assert left[pyc[name]] == (f"differs from what python3.11 compiles from "
                                   f"{PYDIR}/{name}.py (which matches its package): "
                                   "planted or stale bytecode")
    assert left[pyc["planted"]] == (f"its source {PYDIR}/planted.py is not vouched for: "
                                    "not owned by any package")
    assert left[pyc["tampered"]].startswith(
        f"its source {PYDIR}/tampered.py is not vouched for: content differs from what "
        f"dpkg shipped ({PYPKG} 1.1")
    assert set(left) == {pyc["other"], pyc["payload"], pyc["planted"], pyc["tampered"],
                         f"{PYDIR}/planted.py", f"{PYDIR}/tampered.py"}


@needs_root
def test_bytecode_of_the_wrong_shape_stays_open(tmp_path: Path,
                                               pyc_package: dict[str, Path]) -> None:
    """Genuine bytes are not enough: a world-writable .pyc, or a .pyc for an
    interpreter that is not there, is not what py3compile makes."""
    log = tmp_path / "dpkg.log"
    dpkg_cmd(f"--log={log}", "-i", str(pyc_package["1.0"]))
    run = policy(tmp_path, [PYDIR])
    assert run("init").exit_code == 0
    dpkg_cmd(f"--log={log}", "-i", str(pyc_package["1.1"]))
    fine = f"{PYDIR}/__pycache__/fine.cpython-311.pyc"
    os.chmod(fine, 0o666)
    future = f"{PYDIR}/__pycache__/other.cpython-399.pyc"
    shutil.copy(f"{PYDIR}/__pycache__/other.cpython-311.pyc", future)
    changes_of(run)
    _, left = approve(run)
    assert left[fine] == "mode 0666; python3.11 makes it 0644"
    assert left[future] == "cannot compile it again: /usr/bin/python3.99 is not installed"


@needs_root
def test_removed_bytecode_passes_once_its_source_is_gone(tmp_path: Path,
                                                        pyc_package: dict[str, Path]) -> None:
    log = tmp_path / "dpkg.log"
    dpkg_cmd(f"--log={log}", "-i", str(pyc_package["1.1"]))
    run = policy(tmp_path, [PYDIR])
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    other = f"{PYDIR}/__pycache__/other.cpython-311.pyc"
    os.unlink(other)  # by hand, while its source is still there
    changes_of(run)
    approved, left = approve(run)
    assert left == {other: f"removed while its source {PYDIR}/other.py and python3.11 "
                           "are still there"}
    assert approved == {f"{PYDIR}/__pycache__": "derived:python-bytecode"}

    dpkg_cmd("--purge", PYPKG)  # logged where approvals look: explains the package's files
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert {p for p, c in changes.items() if c["kind"] == "removed"} == set(approved)
    assert approved[other] == approved[f"{PYDIR}/__pycache__/fine.cpython-311.pyc"] == \
        "derived:python-bytecode"
    assert approved[f"{PYDIR}/fine.py"] == "package-db"


@needs_root
def test_a_planted_name_is_shown_escaped(tmp_path: Path,
                                         pyc_package: dict[str, Path]) -> None:
    """A name chosen to rewrite the operator's terminal is shown escaped; JSON exact."""
    dpkg_cmd(f"--log={tmp_path / 'dpkg.log'}", "-i", str(pyc_package["1.1"]))
    run = policy(tmp_path, [PYDIR])
    assert run("init").exit_code == 0
    name = "\x1b]0;pwned\x07x"
    Path(f"{PYDIR}/__pycache__/{name}.cpython-311.pyc").write_bytes(b"\0" * 16)
    changes_of(run)
    result = run("approve", "--package-updates")
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert (f"left open added {PYDIR}/__pycache__/\\x1b]0;pwned\\x07x.cpython-311.pyc: "
            f"its source {PYDIR}/\\x1b]0;pwned\\x07x.py is not vouched for: cannot read "
            f"{PYDIR}/\\x1b]0;pwned\\x07x.py: No such file or directory") in result.stdout
    _, left = approve(run)
    assert f"{PYDIR}/__pycache__/{name}.cpython-311.pyc" in left


# -- the parts, on their own -------------------------------------------------------------

def _record(path: bytes, kind: str = "file") -> FileRecord:
    return FileRecord(path, kind, None, 0, 0o644, 0, 0, 1, 1, 0, 0, None, None, 0)


def test_an_initramfs_stays_open_saying_how_to_approve_it() -> None:
    path = b"/boot/initrd.img-6.1.0-99-amd64"
    change = Change(path, _record(path), _record(path),
                    Verdict(False, "not owned by any package"))
    [verdict] = rejudge(PackageManagers(), [change])
    assert not verdict.vouched
    assert verdict.reason.startswith("not owned by any package; an initramfs is built by "
                                     "update-initramfs")
    assert "README" in verdict.reason


@needs_root
def test_tools_run_without_network_and_only_when_vouched(tmp_path: Path) -> None:
    ctx = Context(PackageManagers(), [])
    sandbox = ctx.sandbox
    try:
        cat = sandbox.tool("/usr/bin/cat")
        out = sandbox.run([cat, "/proc/self/net/dev"], cwd=sandbox.tempdir("t-"))
        interfaces = [line.split(b":")[0].strip() for line in out.splitlines()[2:]]
        assert interfaces == [b"lo"]
        script = tmp_path / "tool"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o755)
        with pytest.raises(ToolError, match=r"will not run .*not owned by any package"):
            sandbox.tool(str(script))
    finally:
        sandbox.close()


def test_every_evidence_fits_the_event_column() -> None:
    from integrity.store import schema as models
    from integrity.packages.derived import evidence, kinds

    width = models.event.c.evidence.type.length
    names = {k.name for k in kinds()}
    assert {"python-bytecode", "alternatives", "ldconfig", "deb-systemd-helper"} <= names
    assert all(len(evidence(name)) <= width for name in names)


@needs_root
def test_a_cache_tool_never_loads_a_module_no_package_ships() -> None:
    """gio-querymodules runs the modules it describes: one planted beside them keeps the
    cache open, and the tool is not run at all."""
    modules = next(p for p in listed("libglib2.0-0") if p.endswith("/gio/modules"))
    cache = os.fsencode(os.path.join(modules, "giomodule.cache"))
    planted = os.path.join(modules, "libintegrity-test-planted.so")
    st = os.lstat(cache)
    live = FileRecord.from_stat(cache, st)
    before = live._replace(inode=live.inode + 1)
    with exclusive():
        Path(planted).write_bytes(b"not a library\n")
        try:
            [verdict] = rejudge(PackageManagers(), [
                Change(cache, before, live, Verdict(False, "not owned by any package"))])
        finally:
            os.unlink(planted)
    assert verdict == Verdict(False, f"cannot make {modules}/giomodule.cache again: "
                              f"gio-querymodules would load {planted}, which is not "
                              "vouched for: not owned by any package")


@needs_root
def test_require_signed_derives_only_from_signed_inputs(tmp_path: Path) -> None:
    """With require_signed a derived file needs inputs the signed archive vouches for:
    here no keyring is trusted (no keyring check), so the gio module cache stays open on
    its modules and tool, which only dpkg's database vouches for; and alternatives,
    which decide from dpkg's own alternatives database, vouch for nothing."""
    modules = next(p for p in listed("libglib2.0-0") if p.endswith("/gio/modules"))
    cache = os.fsencode(os.path.join(modules, "giomodule.cache"))
    live = FileRecord.from_stat(cache, os.lstat(cache))
    link = tmp_path / "editor"
    link.symlink_to("/etc/alternatives/editor")
    made = FileRecord.from_stat(os.fsencode(link), os.lstat(link))._replace(
        link=b"/etc/alternatives/editor")
    strict = PackageManagers(rpm=None, require_signed=True)
    with exclusive():
        cached, alternative = rejudge(strict, [
            Change(cache, live._replace(inode=live.inode + 1), live,
                   Verdict(False, "not owned by any package")),
            Change(made.path, None, made, Verdict(False, "not owned by any package"))])
    assert not cached.vouched
    assert "only dpkg's database vouches for it" in cached.reason, cached.reason
    assert "--require-signed asks for the signed archive" in cached.reason
    assert alternative == Verdict(
        False, "alternatives decides from dpkg's alternatives database, which no "
        "signature covers, and --require-signed asks for signed evidence")
