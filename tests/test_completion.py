"""Shell completion (click's own machinery) and quiet ends on closed pipes, run as an
operator would: the installed entry point in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Cli

INTEGRITY = [sys.executable, "-c", "from integrity.cli import main; main()"]


def integrity(*args: str, env: dict[str, str] | None = None,
              **kwargs: object) -> subprocess.CompletedProcess[str]:
    # argv[0] is "-c" under python -c; click names the program from prog_name anyway.
    return subprocess.run([*INTEGRITY, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60,
                          check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_our_variable(shell: str) -> None:
    result = integrity("completion", shell)
    assert result.returncode == 0, result.stderr
    assert "_INTEGRITY_COMPLETE" in result.stdout
    assert f"{shell}_complete" in result.stdout


def test_bash_script_parses_and_completes_for_real(tmp_path: Path) -> None:
    script = tmp_path / "integrity.bash"
    script.write_text(integrity("completion", "bash").stdout)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # What bash asks when a user presses TAB after `integrity ev`, answered by the
    # real program through the script's own protocol.
    answer = integrity(env={"_INTEGRITY_COMPLETE": "bash_complete",
                            "COMP_WORDS": "integrity ev", "COMP_CWORD": "1"})
    assert answer.returncode == 0
    assert "plain,events" in answer.stdout.split()
    options = integrity(env={"_INTEGRITY_COMPLETE": "bash_complete",
                             "COMP_WORDS": "integrity events --by ", "COMP_CWORD": "3"})
    assert {"plain,hour", "plain,weekday", "plain,actor", "plain,rule",
            "plain,dir"} <= set(options.stdout.split())
    # And sourced into a real bash, the function is defined under the program's name.
    sourced = subprocess.run(["bash", "-c", f"source {script}; complete -p integrity"],
                             capture_output=True, text=True)
    assert sourced.returncode == 0 and "integrity" in sourced.stdout, sourced.stderr


@pytest.mark.parametrize("shell, check", [("zsh", ["zsh", "-n"]),
                                          ("fish", ["fish", "--no-execute"])])
def test_zsh_and_fish_scripts_parse(tmp_path: Path, shell: str, check: list[str]) -> None:
    """scripts/test installs both shells: each parses its own script."""
    script = tmp_path / f"integrity.{shell}"
    script.write_text(integrity("completion", shell).stdout)
    checked = subprocess.run([*check, str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_unknown_shell_is_refused() -> None:
    result = integrity("completion", "tcsh")
    assert result.returncode == 2 and "tcsh" in result.stderr


def test_help_examples_name_real_commands() -> None:
    """Every `integrity ...` line in an Example: block of --help starts with a command
    that exists (the examples stay true)."""
    from integrity.cli import cli

    import click
    ctx = click.Context(cli)
    commands: list[tuple[str, click.Command]] = [("", cli)]
    examples: list[list[str]] = []
    while commands:
        prefix, command = commands.pop()
        for line in (command.help or "").splitlines():
            words = line.split()
            if words[:1] == ["integrity"]:
                examples.append(words[1:])
        if isinstance(command, click.Group):
            commands += [(f"{prefix} {name}", sub) for name, sub in command.commands.items()]
    assert any(e[:1] == ["expect"] for e in examples)
    for words in examples:
        group: click.Command = cli
        for word in words:
            if word.startswith("-") or not isinstance(group, click.Group):
                break
            sub = group.get_command(ctx, word)
            assert sub is not None, f"example names an unknown command: {' '.join(words)}"
            group = sub


@pytest.mark.parametrize("args", [
    ("events", "--stats"), ("events", "--stats", "--by", "actor", "--json"),
    ("events", "--access"), ("events", "--access", "--json"), ("metrics",),
    ("completion", "bash"), ("expect", "--for", "1h", "--reason", "x", "--json"),
    ("status",), ("status", "--json"),
])
def test_a_closed_pipe_ends_quietly(run: Cli, tree: Path, args: tuple[str, ...]) -> None:
    """`integrity ... | head -0`: the reader is gone before we write a byte; we end
    as cat does (SIGPIPE), with nothing on stderr."""
    assert run("init").exit_code == 0
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [*INTEGRITY, "--db", f"sqlite:///{run.db}", "--policy", str(run.policy), *args],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert result.stderr == "", result.stderr
    assert result.returncode in (0, -signal.SIGPIPE), result.returncode
