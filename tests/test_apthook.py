"""The apt hook, end to end: the snippet apt reads, installing and removing it, and a
real `apt-get install` of a local .deb that runs it.

The apt run uses a private apt configuration (APT_CONFIG naming a file whose
Dir::Etc::parts is a temporary directory holding only our snippet), so none of the
host's apt hooks run and the host's apt configuration is not touched. Local .deb
installs need no network. The test owns the package `integrity-test-upg`, purges it
afterwards and takes the test packages' lock (tests/debs.py) while it does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from integrity import __version__
from integrity.cli import cli

from conftest import REPO, Cli, one_line
from debs import build_deb, dpkg, owned

MARKER = "// integrity apt hook"


def integrity_command() -> str:
    """The installed `integrity` console script of this interpreter (what people run)."""
    beside = Path(sys.executable).with_name("integrity")
    found = str(beside) if beside.exists() else shutil.which("integrity")
    if found is None:
        pytest.skip("the integrity console script is not installed")
    return found


def integrity(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([integrity_command(), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def snippet_command(snippet: str) -> str:
    """The shell command inside the snippet's DPkg::Post-Invoke string."""
    match = re.search(r'DPkg::Post-Invoke \{ "(.*)"; \};', snippet)
    assert match, snippet
    return match.group(1)


def hook_executable(command: str) -> str:
    match = re.match(r"if \[ -x (\S+) \]; then ", command)
    assert match, command
    [executable] = shlex.split(match.group(1))
    return executable


def private_apt(tmp_path: Path, parts: Path) -> dict[str, str]:
    """Environment for apt tools reading only `parts` (and no package cache files)."""
    main = tmp_path / "apt.conf"
    main.write_text(f'Dir::Etc::parts "{parts}/";\nDir::Cache::pkgcache "";\n'
                    f'Dir::Cache::srcpkgcache "";\n')
    return {**os.environ, "APT_CONFIG": str(main), "DEBIAN_FRONTEND": "noninteractive"}


needs_apt = pytest.mark.skipif(shutil.which("apt-config") is None,
                               reason="apt is not installed")


# -- the snippet ---------------------------------------------------------------------------

@needs_apt
def test_show_prints_a_snippet_apt_config_parses(tmp_path: Path) -> None:
    policy = tmp_path / "policy dir" / "policy.toml"  # a space: quoted for the shell
    policy.parent.mkdir()
    policy.write_text(f'[[rule]]\npath = "{tmp_path}"\n')
    url = f"sqlite:///{tmp_path}/state/integrity.db"
    proc = integrity("--db", url, "--policy", str(policy), "apt-hook", "show")
    assert proc.returncode == 0, proc.stderr
    snippet = proc.stdout
    assert snippet.startswith(MARKER)
    command = snippet_command(snippet)

    file = tmp_path / "80integrity"
    file.write_text(snippet)
    parts = tmp_path / "empty.d"
    parts.mkdir()
    dump = subprocess.run(["apt-config", "-c", str(file), "dump"], capture_output=True,
                          text=True, timeout=30, env=private_apt(tmp_path, parts))
    assert dump.returncode == 0, dump.stderr
    entries = [line for line in dump.stdout.splitlines()
               if line.startswith('DPkg::Post-Invoke:: "')]
    assert entries == [f'DPkg::Post-Invoke:: "{command}";'], dump.stdout

    # The command is valid shell and runs this integrity with the options given.
    assert subprocess.run(["sh", "-n", "-c", command], timeout=10).returncode == 0
    words = shlex.split(command.replace(";", " ; "))
    assert ["--db", url] == words[words.index("--db"):words.index("--db") + 2]
    assert ["--policy", str(policy)] == \
        words[words.index("--policy"):words.index("--policy") + 2]
    assert "verify" in words and "--package-updates" in words
    executable = hook_executable(command)
    assert os.access(executable, os.X_OK), executable
    version = subprocess.run([executable, "--version"], capture_output=True, text=True,
                             timeout=30)
    assert __version__ in version.stdout


def test_show_names_the_db_and_policy_given(run: Cli) -> None:
    result = run("apt-hook", "show")
    assert result.exit_code == 0, result.stderr
    command = snippet_command(result.stdout)
    assert f"--db sqlite:///{run.db}" in command
    assert f"--policy {run.policy}" in command
    assert "approve --package-updates" in command
    # Without the options, the hook leaves them to the defaults (and environment).
    plain = CliRunner().invoke(cli, ["apt-hook", "show"], catch_exceptions=False)
    assert plain.exit_code == 0
    assert "--db" not in plain.stdout and "--policy" not in plain.stdout


def test_the_hook_never_fails_apt(tmp_path: Path) -> None:
    """Whatever goes wrong inside, the command exits 0: apt must never fail over it."""
    missing = tmp_path / "no" / "such" / "dir" / "integrity.db"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{tmp_path}"\n')
    proc = integrity("--db", f"sqlite:///{missing}", "--policy", str(policy),
                     "apt-hook", "show")
    assert proc.returncode == 0, proc.stderr
    command = snippet_command(proc.stdout)
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert not missing.exists() and not missing.parent.exists()
    # An executable that is gone (integrity uninstalled) is no failure either.
    gone = command.replace(hook_executable(command), str(tmp_path / "uninstalled"))
    assert subprocess.run(["sh", "-c", gone], timeout=30).returncode == 0


def test_a_hook_written_by_python_m_integrity_runs_integrity(tmp_path: Path) -> None:
    """`python3 -m integrity apt-hook install` must name a command that runs, not
    the package's __main__.py (which the hook's `[ -x ]` test silently skips)."""
    proc = subprocess.run([sys.executable, "-m", "integrity", "--db",
                           f"sqlite:///{tmp_path}/i.db", "apt-hook", "show"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    command = snippet_command(proc.stdout)
    executable = hook_executable(command)
    assert os.access(executable, os.X_OK), \
        f"the hook would silently never run: {executable} is not executable"
    version = subprocess.run([executable, "--version"], capture_output=True, text=True,
                             timeout=30)
    assert __version__ in version.stdout


# -- install and remove ---------------------------------------------------------------------

def test_install_writes_the_snippet_and_remove_deletes_it(run: Cli, tmp_path: Path) -> None:
    directory = tmp_path / "apt.conf.d"
    directory.mkdir()
    target = directory / "80integrity"
    result = run("apt-hook", "install", "--dir", str(directory))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"installed {target}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == run("apt-hook", "show").stdout
    assert target.read_text().startswith(MARKER)
    # Installing again replaces it; nothing else is left in the directory.
    assert run("apt-hook", "install", "--dir", str(directory)).exit_code == 0
    assert sorted(p.name for p in directory.iterdir()) == ["80integrity"]

    result = run("apt-hook", "remove", "--dir", str(directory))
    assert (result.exit_code, result.stdout) == (0, f"removed {target}\n")
    assert not target.exists()
    result = run("apt-hook", "remove", "--dir", str(directory))
    assert (result.exit_code, result.stdout) == (0, "no apt hook installed\n")


def test_remove_refuses_a_file_not_written_by_integrity(run: Cli, tmp_path: Path) -> None:
    directory = tmp_path / "apt.conf.d"
    directory.mkdir()
    foreign = directory / "80integrity"
    content = 'DPkg::Post-Invoke { "echo the admin\'s own hook"; };\n'
    foreign.write_text(content)
    result = run("apt-hook", "remove", "--dir", str(directory))
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert str(foreign) in line and "not written by integrity" in line
    assert result.stdout == ""
    assert foreign.read_text() == content


def test_install_into_a_missing_directory_exits_2(run: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-apt" / "apt.conf.d"
    result = run("apt-hook", "install", "--dir", str(missing))
    assert result.exit_code == 2
    assert str(missing) in one_line(result.stderr)
    assert not missing.exists()


def test_a_path_apt_cannot_quote_is_refused(run: Cli, tmp_path: Path) -> None:
    policy = tmp_path / 'say "hi".toml'
    shutil.copy(run.policy, policy)
    directory = tmp_path / "apt.conf.d"
    directory.mkdir()
    for args in (["apt-hook", "show"], ["apt-hook", "install", "--dir", str(directory)]):
        result = run(*args, policy=policy)
        assert result.exit_code == 2
        assert "double quote" in one_line(result.stderr)
    assert list(directory.iterdir()) == []


# -- a real apt run -------------------------------------------------------------------------

PKG = "integrity-test-upg"
SHARE = "/usr/share/integrity-test-upg"
DATA = f"{SHARE}/data"
NOTES = f"{SHARE}/notes"
DROPPED = f"{SHARE}/dropped"
LIB = "/usr/lib/integrity-test-upg"
TOOL = f"{LIB}/tool"
CONF = "/etc/integrity-test-upg.conf"
UNOWNED = f"{SHARE}/unowned"


def _files(version: str) -> dict[str, bytes | tuple[bytes, int]]:
    files: dict[str, bytes | tuple[bytes, int]] = {
        DATA: f"data of version {version}\n".encode(),
        NOTES: b"notes no version changes\n",
        TOOL: (f"#!/bin/sh\necho integrity-test-upg {version}\n".encode(), 0o755),
        CONF: f"setting = {version}\n".encode(),
    }
    if version == "1.0":
        files[DROPPED] = b"dropped in 1.1\n"
    return files


@pytest.fixture
def upgradable(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Version 1.0 installed (dpkg logging to a temporary file), 1.1 ready as a .deb;
    everything purged afterwards."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("dpkg", "dpkg-deb",
                                                                 "apt-get")):
        pytest.skip("installs real packages: needs root, dpkg and apt-get")
    debs = {v: build_deb(tmp_path, PKG, v, _files(v), [CONF]) for v in ("1.0", "1.1")}
    log = tmp_path / "dpkg.log"
    with owned(PKG, log, (SHARE, LIB, CONF), scratch=(SHARE, LIB)):
        dpkg(log, "-i", str(debs["1.0"]))
        yield debs


def test_apt_get_install_runs_the_hook_and_approves_the_upgrade(
        tmp_path: Path, upgradable: dict[str, Path]) -> None:
    policy = tmp_path / "policy dir" / "policy.toml"
    policy.parent.mkdir()
    policy.write_text(
        f'[[rule]]\npath = "{SHARE}"\ncheck = "static"\nseverity = "high"\n\n'
        f'[[rule]]\npath = "{LIB}"\ncheck = "static"\nseverity = "critical"\n\n'
        f'[[rule]]\npath = "{CONF}"\ncheck = "config"\n')
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    parts = tmp_path / "apt.conf.d"
    parts.mkdir()
    installed = integrity("--db", f"sqlite:///{run.db}", "--policy", str(policy),
                          "apt-hook", "install", "--dir", str(parts))
    assert installed.returncode == 0, installed.stderr
    with open(UNOWNED, "wb") as handle:  # by hand, before apt runs: no package explains it
        handle.write(b"nobody ships this\n")

    apt = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends",
         "-o", "Dpkg::Options::=--force-confold",
         # Wait for dpkg's lock while another run on this machine holds it.
         "-o", "DPkg::Lock::Timeout=300", str(upgradable["1.1"])],
        capture_output=True, text=True, timeout=300, env=private_apt(tmp_path, parts),
        stdin=subprocess.DEVNULL)
    assert apt.returncode == 0, apt.stdout + apt.stderr
    assert f"Setting up {PKG} (1.1)" in apt.stdout
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PKG],
                             capture_output=True, text=True, check=True).stdout
    assert version == "1.1"

    rows = json.loads(run("events", "--json").stdout)
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows)
    assert {DATA, TOOL, CONF, DROPPED, UNOWNED} <= set(by_path)
    open_rows = [row for row in rows if row["status"] == "open"]
    assert [(r["path"], r["classification"]) for r in open_rows] == \
        [(UNOWNED, "unexplained")]
    for row in rows:
        if row["path"] != UNOWNED:
            assert (row["status"], row["classification"], row["evidence"]) == \
                ("approved", "package-update", "package-db"), row
    with sqlite3.connect(f"file:{run.db}?mode=ro", uri=True) as conn:
        [(reason, mode)] = list(conn.execute("SELECT reason, mode FROM approval"))
    assert (reason, mode) == ("apt: dpkg run", "package-updates")
    verify = run("verify", "--json")
    assert verify.exit_code == 1
    assert [c["path"] for c in json.loads(verify.stdout)["changes"]] == [UNOWNED]
