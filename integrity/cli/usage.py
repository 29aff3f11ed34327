"""Commands on how the host is used and watched: usage statistics and access records
(through `events`), maintenance windows, metrics, shell completion."""

from __future__ import annotations

import sys

import click

from integrity.cli.app import Env, cli, pass_env
from integrity.errors import UsageError

#: `events --stats` looks this far back unless --since says otherwise.
STATS_SINCE = "30d"


def show_usage(env: Env, *, stats: bool, by: str, since: str | None, access: bool,
               as_json: bool, open_only: bool) -> None:
    """`events --stats` and `events --access`."""
    from integrity.report import dump_json
    from integrity.report_usage import access_text, stats_json, stats_text
    from integrity.times import parse_since

    if open_only:
        raise UsageError("--open lists events; it cannot be combined with --stats or "
                         "--access")
    store = env.store()
    if stats:
        from integrity.ops.stats import collect

        result = collect(store, by, parse_since(since or STATS_SINCE),
                         "access" if access else "changes")
        if as_json:
            dump_json(stats_json(result), sys.stdout)
        else:
            stats_text(result, sys.stdout)
        return
    rows = store.access.list(since=parse_since(since) if since else None)
    if as_json:
        dump_json(rows, sys.stdout)
    else:
        access_text(rows, sys.stdout)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--for", "duration", metavar="DURATION",
              help="How long the window stays open: 30m, 2h, 1d (at most 7d).")
@click.option("--reason", metavar="TICKET",
              help="Why: the ticket, attached to every change the window covers.")
@click.option("--cancel", "cancel_id", type=int, metavar="ID",
              help="End window ID now.")
@click.option("--json", "as_json", is_flag=True, help="Print the window as JSON.")
@pass_env
def expect(env: Env, paths: tuple[str, ...], duration: str | None, reason: str | None,
           cancel_id: int | None, as_json: bool) -> None:
    """Open a maintenance window: changes under PATHS (default: every protected
    path) from now on, for --for, are expected.

    They are recorded as `expected` (low severity, the ticket attached, the actor
    kept) and stay open until approved, so a planned change neither pages anyone
    nor slips into the baseline unseen. A change made before the window opened, or
    after it closed, is judged as usual. `status` lists open windows; windows are
    chained in the event log, and a forged one is reported and ignored.

    Example:

    \b
        integrity expect --for 30m --reason CHG-1234 /etc/nginx
        integrity expect --cancel 3
    """
    from integrity.paths import escape as clean
    from integrity.ops.who import invoking_label, invoking_user
    from integrity.ops.windows import cancel_window, describe, open_window, window_doc
    from integrity.report import dump_json

    if cancel_id is not None:
        if paths or duration or reason:
            raise UsageError("expect --cancel ID takes no PATHs, --for or --reason")
        window, ended = cancel_window(env.store(), cancel_id, invoking_label())
        verb = "cancelled" if ended else "already over:"
    else:
        if not duration or reason is None:
            raise UsageError("expect: --for DURATION and --reason TICKET are required "
                             "(or --cancel ID)")
        user, sudo_user = invoking_user()
        window = open_window(env.store(), env.policy, paths, duration, reason,
                             user=user, sudo_user=sudo_user)
        verb = "opened"
    if as_json:
        dump_json(window_doc(window), sys.stdout)
    else:
        click.echo(clean(f"{verb} {describe(window)}"))


@cli.command()
@pass_env
def metrics(env: Env) -> None:
    """Print this host's metrics in the OpenMetrics text format.

    The same values the watcher serves on `[metrics] listen` and verify writes to
    `[metrics] textfile` (node_exporter's textfile collector): last successful scan
    and its duration, baseline entries, open events by severity, changes by kind,
    inotify overflows, undelivered alerts by sink, whether the baseline seal and
    the event chain are intact.

    Example:

        integrity metrics | grep integrity_open_events
    """
    from integrity.ops.metrics import openmetrics

    sys.stdout.buffer.write(openmetrics(env.store(), env.policy))
    sys.stdout.flush()


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (click's own).

    Example:

    \b
        integrity completion bash > /etc/bash_completion.d/integrity
        integrity completion zsh > "${fpath[1]}/_integrity"
        integrity completion fish > ~/.config/fish/completions/integrity.fish
    """
    from click.shell_completion import get_completion_class

    completion_class = get_completion_class(shell)
    assert completion_class is not None  # click ships all three
    # The variable click's main() looks for: _INTEGRITY_COMPLETE for prog "integrity".
    script = completion_class(cli, {}, "integrity", "_INTEGRITY_COMPLETE").source()
    click.echo(script)
