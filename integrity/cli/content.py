"""Commands on kept content: show what changed inside a file, and put it back."""

from __future__ import annotations

import sys

import click

from integrity.cli.app import Env, cli, echo, pass_env
from integrity.errors import UsageError
from integrity.paths import display


@cli.command("diff")
@click.argument("path", type=click.Path(readable=False))
@pass_env
def diff_command(env: Env, path: str) -> None:
    """Show the baseline's content of PATH against the live file (a unified diff).

    Values of lines that look like credentials are shown as <redacted:TAG>; the
    content of secrets (shadow files, private keys, *.key, ...) is never kept, and
    never shown.

    Exit status: 0 no difference, 1 a difference, 2 when there is nothing to compare.

    Example:

        integrity diff /etc/ssh/sshd_config
    """
    from integrity.ops.content import diff_path

    outcome = diff_path(env.store(), env.policy, path)
    if outcome.diff is None:
        raise UsageError(f"{display(outcome.path)}: {outcome.reason}")
    click.echo(outcome.diff, nl=False)
    sys.exit(1 if outcome.diff else 0)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_env
def restore(env: Env, paths: tuple[str, ...], yes: bool) -> None:
    """Put PATHS back as the baseline has them: content, mode, owner (and extended
    attributes), atomically, and record who did it.

    Only files whose content the baseline kept can be restored (rules with 'diff' in
    their check, text files up to max_diff_size); a file kept with redacted values
    is refused. The baseline's seal is checked first. Asks for confirmation on a
    terminal; elsewhere --yes is required.

    Example:

        integrity restore /etc/ssh/sshd_config --yes
    """
    from integrity.ops.content import restore as restore_paths

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("restore: not on a terminal: confirm with --yes")
        click.confirm(f"Put back {len(paths)} path(s) as the baseline has them?",
                      abort=True)
    for item in restore_paths(env.store(), env.policy, paths):
        echo(f"restored {display(item.path)} (event {item.event_id})")
