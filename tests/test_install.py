"""scripts/install on Debian's own /usr/bin/python3 (whose pip refuses to install
outside a virtual environment: PEP 668), into a temporary prefix, then the installed
program run for real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
DEBIAN_PYTHON = Path("/usr/bin/python3")

pytestmark = pytest.mark.skipif(not DEBIAN_PYTHON.exists(),
                                reason="not a Debian host (/usr/bin/python3 missing)")


def install(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), "--python", str(DEBIAN_PYTHON), "--prefix", str(tmp_path / "opt"),
         "--bin-dir", str(tmp_path / "bin"), "--etc", str(tmp_path / "etc"),
         "--systemd-dir", str(tmp_path / "systemd"), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_debian_python_refuses_a_plain_pip_install() -> None:
    """The reason the script exists: PEP 668 on Debian."""
    assert Path("/usr/lib/python3.11/EXTERNALLY-MANAGED").exists()
    env = {k: v for k, v in os.environ.items() if k != "PIP_BREAK_SYSTEM_PACKAGES"}
    result = subprocess.run([str(DEBIAN_PYTHON), "-m", "pip", "install", "--dry-run",
                             str(REPO)], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode != 0
    assert "externally-managed-environment" in result.stderr + result.stdout


def test_install_into_a_prefix_then_baseline_and_verify(tmp_path: Path) -> None:
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    link = tmp_path / "bin" / "integrity"
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "opt" / "bin" / "integrity")
    # Debian's interpreter, in an environment of its own.
    cfg = (tmp_path / "opt" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    policy = tmp_path / "etc" / "policy.toml"
    shipped = (REPO / "integrity" / "policies" / "default.toml").read_text()
    assert policy.read_text() == shipped and (policy.stat().st_mode & 0o777) == 0o644
    for unit in ("integrity.service", "integrity-verify.service", "integrity-verify.timer"):
        text = (tmp_path / "systemd" / unit).read_text()
        assert "/usr/local/bin/integrity" not in text
    assert f"ExecStart={link} watch" in (tmp_path / "systemd" / "integrity.service").read_text()
    assert f"ExecStart={link} -q verify" in \
        (tmp_path / "systemd" / "integrity-verify.service").read_text()
    # The installed program, not this checkout: baseline and verify a small tree.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    small = tmp_path / "small.toml"
    small.write_text(f'[[rule]]\npath = "{tree}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base = [str(link), "--db", f"sqlite:///{tmp_path / 'state.db'}", "--policy", str(small)]
    for args, code in ((["init"], 0), (["verify"], 0)):
        ran = subprocess.run([*base, *args], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert ran.returncode == code, ran.stderr
    (tree / "f").write_text("y\n")
    ran = subprocess.run([*base, "verify"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert ran.returncode == 1 and "1 modified" in ran.stdout
    where = subprocess.run([str(link), "--version"], capture_output=True, text=True,
                           env=env)
    assert where.returncode == 0 and where.stdout.startswith("integrity")
    imported = subprocess.run(
        [str(tmp_path / "opt" / "bin" / "python"), "-c",
         "import integrity, prometheus_client; print(integrity.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert imported.stdout.startswith(str(tmp_path / "opt")), imported
    # Again: an upgrade in place that keeps the operator's policy.
    policy.write_text(shipped + "\n# edited by the operator\n")
    again = install(tmp_path, "--no-systemd")
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and policy.read_text().endswith("# edited by the operator\n")


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    for args, words in ((["--prefix", "relative"], "not an absolute path"),
                        (["--frobnicate"], "unknown option"),
                        (["--prefix"], "needs a value"),
                        (["--python", str(tmp_path / "nope")], "no python3")):
        result = subprocess.run([str(INSTALL), *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_help_lists_the_options() -> None:
    result = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--prefix", "--bin-dir", "--etc", "--systemd-dir", "--no-systemd",
                   "--python"):
        assert option in result.stdout


def test_readme_first_commands_install_and_test() -> None:
    """The README's first two commands: install and run the main job, then the suite."""
    lines = (REPO / "README.md").read_text().splitlines()
    commands = [line.strip() for line in lines if line.startswith("    ") and line.strip()]
    assert commands[:2] == ["scripts/install && integrity init && integrity verify",
                            "scripts/test"]
