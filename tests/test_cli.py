"""The command line as a user meets it: help, version, errors, options and environment.

Everything runs the real click CLI (CliRunner, catch_exceptions=False) on real files
and a real SQLite database; where a separate process matters (what really reaches
stderr, tracebacks), `python3 -m integrity` runs as a subprocess.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import integrity.policy
from integrity import __version__
from integrity.cli import cli

from conftest import (HOST_DEFAULT_URL, HOST_POLICY, HOST_STATE, REPO, Cli, HostGuard,
                      one_line)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI without the `run` fixture's --db/--policy (help, version, environment)."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def subprocess_cli(*args: str, env: dict[str, str] | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python3 -m integrity ARGS` in a separate process, with the test's environment."""
    return subprocess.run([sys.executable, "-m", "integrity", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


# -- help and version ------------------------------------------------------------------

def _commands(group: click.Group, prefix: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


ALL_COMMANDS = [((), cli), *_commands(cli)]


@pytest.mark.parametrize("path, command", ALL_COMMANDS,
                         ids=[" ".join(p) or "integrity" for p, _ in ALL_COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    """sqlite-utils' test_docs: every command and group documents itself, with -h."""
    assert command.help and command.help.strip(), f"{' '.join(path)} has no help text"
    result = invoke(*path, "-h")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    first = command.help.strip().splitlines()[0]
    assert first in result.stdout
    assert result.stdout == invoke(*path, "--help").stdout


def test_expected_commands_exist() -> None:
    names = {" ".join(path) for path, _ in _commands(cli)}
    assert {"init", "verify", "db", "db upgrade"} <= names


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = invoke(flag)
    assert result.exit_code == 0
    assert __version__ in result.stdout
    assert result.stdout.count("\n") == 1


# -- a bad policy ----------------------------------------------------------------------

BAD_POLICIES = {
    "syntax": ("[[rule]\npath = '/etc'\n", "invalid TOML"),
    "unknown-key": ("[[rule]]\npath = '/etc'\ncolour = 'blue'\n", "rule[0].colour"),
    "bad-severity": ("[[rule]]\npath = '/etc'\nseverity = 'urgent'\n", "rule[0].severity"),
    "top-level-key": ("databse = 'sqlite://'\n[[rule]]\npath = '/etc'\n", "databse"),
}


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
@pytest.mark.parametrize("command", [["init"], ["verify"], ["verify", "--json"]])
def test_bad_policy_exits_2_with_one_line(run: Cli, tmp_path: Path, name: str,
                                          command: list[str]) -> None:
    text, key = BAD_POLICIES[name]
    bad = tmp_path / f"{name}.toml"
    bad.write_text(text)
    result = run(*command, policy=bad)
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith("integrity: ")
    assert str(bad) in line
    assert key in line
    assert result.stdout == ""
    # No partial policy was applied: nothing was written anywhere.
    assert not run.db.exists()


def test_bad_policy_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[[rule]]\npath = '/etc'\nseverity = 'urgent'\n")
    proc = subprocess_cli("--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--policy",
                          str(bad), "verify")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(bad) in line and "rule[0].severity" in line


def test_missing_policy_file_exits_2(run: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run("verify", policy=missing)
    assert result.exit_code == 2
    assert str(missing) in one_line(result.stderr)


# -- database and baseline states ------------------------------------------------------

def test_verify_without_database_exits_2_and_creates_nothing(run: Cli) -> None:
    result = run("verify")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "run 'integrity init'" in line
    assert str(run.db) in line
    assert result.stdout == ""
    assert not run.db.exists()
    # --json does not change that: a fatal error is not a JSON document.
    result = run("verify", "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "run 'integrity init'" in one_line(result.stderr)
    assert not run.db.exists()


def test_verify_with_schema_but_no_baseline_exits_2(run: Cli) -> None:
    assert run("db", "upgrade").exit_code == 0
    result = run("verify")
    assert result.exit_code == 2
    assert "run 'integrity init'" in one_line(result.stderr)


def _baselines(db: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT id, state, entries FROM baseline ORDER BY id"))


def test_init_twice_refuses_and_force_replaces(run: Cli, tree: Path) -> None:
    first = run("init")
    assert first.exit_code == 0, first.stderr
    assert "baseline" in first.stdout and "7 entries" in first.stdout
    [(old_id, state, entries)] = _baselines(run.db)
    assert (state, entries) == ("active", 7)

    (tree / "new.conf").write_text("new\n")
    again = run("init")
    assert again.exit_code == 2
    line = one_line(again.stderr)
    assert "--force" in line
    assert _baselines(run.db) == [(old_id, "active", 7)]  # untouched
    assert run("verify").exit_code == 1  # the new file is still a change

    forced = run("init", "--force")
    assert forced.exit_code == 0, forced.stderr
    [(new_id, state, entries)] = _baselines(run.db)
    assert (state, entries) == ("active", 8)
    assert new_id != old_id
    assert run("verify").exit_code == 0  # the new file is now part of the baseline


def test_verify_path_outside_every_rule_exits_2(run: Cli, tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = run("verify", str(outside))
    assert result.exit_code == 2
    assert str(outside) in one_line(result.stderr)
    # A sibling whose name merely starts like the protected tree is outside too.
    sibling = tmp_path / "tree-other"
    result = run("verify", str(sibling))
    assert result.exit_code == 2
    assert str(sibling) in one_line(result.stderr)


def test_verify_relative_path_inside_rule(run: Cli, tree: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("init").exit_code == 0
    monkeypatch.chdir(tree)
    assert run("verify", "sub").exit_code == 0
    (tree / "sub" / "c.txt").write_text("changed\n")
    assert run("verify", "sub").exit_code == 1


# -- verbosity -------------------------------------------------------------------------

@pytest.mark.parametrize("flags, traceback_allowed", [([], False), (["-v"], False),
                                                      (["-vv"], True)])
def test_only_vv_may_print_a_traceback(run: Cli, flags: list[str],
                                       traceback_allowed: bool) -> None:
    proc = subprocess_cli("--db", f"sqlite:///{run.db}", "--policy", str(run.policy),
                          *flags, "verify")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines and "run 'integrity init'" in lines[-1]
    if not traceback_allowed:
        assert "Traceback" not in proc.stderr
        assert len(lines) == 1, lines
    assert not run.db.exists()


def test_v_keeps_errors_to_one_line_for_a_corrupt_database(run: Cli) -> None:
    run.db.parent.mkdir(parents=True)
    run.db.write_bytes(b"this is not a database" * 100)
    proc = subprocess_cli("--db", f"sqlite:///{run.db}", "--policy", str(run.policy), "-v",
                          "verify")
    assert proc.returncode == 2
    assert str(run.db) in one_line(proc.stderr)


# -- environment -----------------------------------------------------------------------

def test_environment_variables_are_honoured(tmp_path: Path, tree: Path,
                                            write_policy: Callable[..., Path]) -> None:
    policy = write_policy({"path": str(tree), "check": "config"}, name="env-policy.toml")
    db = tmp_path / "envdb" / "integrity.db"
    env = {"INTEGRITY_DB": f"sqlite:///{db}", "INTEGRITY_POLICY": str(policy)}
    result = invoke("-q", "init", env=env)
    assert result.exit_code == 0, result.stderr
    assert db.exists()
    assert str(db) in result.stdout and str(policy) in result.stdout
    assert invoke("-q", "verify", env=env).exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    result = invoke("-q", "verify", env=env)
    assert result.exit_code == 1
    assert str(tree / "a.conf") in result.stdout

    # The command line wins over the environment.
    other = tmp_path / "other.db"
    result = invoke("-q", "--db", f"sqlite:///{other}", "verify", env=env)
    assert result.exit_code == 2
    assert "run 'integrity init'" in one_line(result.stderr)
    assert not other.exists()


def test_environment_in_a_real_process(tmp_path: Path, tree: Path,
                                       write_policy: Callable[..., Path]) -> None:
    policy = write_policy({"path": str(tree)}, name="env-policy.toml")
    db = tmp_path / "proc.db"
    env = {"INTEGRITY_DB": f"sqlite:///{db}", "INTEGRITY_POLICY": str(policy)}
    proc = subprocess_cli("init", env=env)
    assert proc.returncode == 0, proc.stderr
    assert db.exists()
    proc = subprocess_cli("verify", env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_policy_database_setting_is_used_without_db_option(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    db = tmp_path / "from-policy.db"
    policy = tmp_path / "with-db.toml"
    # `database` is a top-level key, so it comes before the first [[rule]] table.
    policy.write_text(f'database = "sqlite:///{db}"\n\n[[rule]]\npath = "{tree}"\n')
    result = invoke("-q", "--policy", str(policy), "init")
    assert result.exit_code == 0, result.stderr
    assert db.exists()
    assert invoke("-q", "--policy", str(policy), "verify").exit_code == 0


def test_no_test_state_leaks_to_the_host(tmp_path: Path, tree: Path,
                                         host_guard: HostGuard) -> None:
    """Without --db and --policy the CLI falls back to root's defaults: clean_env points
    them into tmp_path, and the guard refuses the host's own (STYLE 9)."""
    # The guard stands over the defaults the product really has.
    if os.geteuid() == 0:
        assert HOST_DEFAULT_URL() == "sqlite:////var/lib/integrity/integrity.db"
    else:
        assert HOST_DEFAULT_URL() == f"sqlite:///{tmp_path}/state/integrity/integrity.db"
    assert HOST_POLICY == "/etc/integrity/policy.toml"
    assert any(HOST_POLICY.startswith(top + "/") for top in HOST_STATE)

    # A command given neither option uses the system policy and the default database,
    # both under tmp_path.
    system_policy = Path(integrity.policy.SYSTEM_POLICY)
    assert system_policy.is_relative_to(tmp_path)
    system_policy.parent.mkdir(parents=True)
    system_policy.write_text(f'[[rule]]\npath = "{tree}"\n')
    result = invoke("-q", "init")
    assert result.exit_code == 0, result.stderr
    default_db = tmp_path / "var-lib-integrity" / "integrity.db"
    assert default_db.exists()
    assert str(default_db) in result.stdout and str(system_policy) in result.stdout
    assert invoke("-q", "verify").exit_code == 0
    assert host_guard.touched == []

    # Naming the host's files explicitly is refused, and remembered even though the
    # CLI turns the refusal into its one-line error (reads only: harmless if the guard
    # ever failed).
    result = invoke("-q", "--db", "sqlite:////var/lib/integrity/integrity.db",
                    "--policy", HOST_POLICY, "verify")
    assert result.exit_code == 2
    assert HOST_POLICY in one_line(result.stderr)
    assert host_guard.touched == [f"open {HOST_POLICY}"]
    with pytest.raises(PermissionError, match="host's integrity state"):
        sqlite3.connect("file:/var/lib/integrity/integrity.db?mode=ro", uri=True)
    assert host_guard.touched[-1] == "sqlite3.connect /var/lib/integrity/integrity.db"
    host_guard.touched.clear()  # what this test did on purpose must not fail it
