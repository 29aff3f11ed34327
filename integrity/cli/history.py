"""Commands on what was recorded: events, status, pruning, and the alert sinks."""

from __future__ import annotations

import sys

import click

from integrity.cli.app import Env, cli, echo, pass_env
from integrity.errors import PolicyError


@cli.command()
@click.option("--open", "open_only", is_flag=True, help="Only events still open.")
@click.option("--since", metavar="WHEN", help="Seen since an ISO time or e.g. 2h, 7d "
              "(--stats: default 30d).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (SPEC format).")
@click.option("--stats", is_flag=True, help="Counts per hour of day, weekday, actor, rule "
              "or directory instead of the events themselves.")
@click.option("--by", type=click.Choice(["hour", "weekday", "actor", "rule", "dir"]),
              default="hour", show_default=True, help="What --stats counts per.")
@click.option("--access", is_flag=True, help="Who opened files under `access = true` "
              "rules (with --stats: count those opens).")
@pass_env
def events(env: Env, open_only: bool, since: str | None, as_json: bool, stats: bool,
           by: str, access: bool) -> None:
    """Show the event history: every change seen, and what became of it.

    --stats counts changes per hour of day, weekday, actor, rule or directory, to
    learn what normal looks like on this host; --access lists who read the files
    of `access = true` rules, one row per file, program, user and hour.

    Example:

    \b
        integrity events --open --since 7d
        integrity events --stats --by hour --since 30d
        integrity events --access --since 1d
    """
    from integrity.report import dump_json, events_text
    from integrity.times import parse_since

    if stats or access:
        from integrity.cli.usage import show_usage

        show_usage(env, stats=stats, by=by, since=since, access=access,
                   as_json=as_json, open_only=open_only)
        return

    rows = env.store().events.list(
        open_only=open_only, since=parse_since(since) if since else None)
    if as_json:
        dump_json(rows, sys.stdout)
    else:
        events_text(rows, sys.stdout)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (SPEC format).")
@click.option("--expect-head", metavar="DIGEST",
              help="Refuse (exit 2) an event chain that does not contain this head.")
@pass_env
def status(env: Env, as_json: bool, expect_head: str | None) -> None:
    """Baseline size, age and seal, open events by severity, watcher and last scan.

    The baseline's seal and signature are checked before its root is shown.

    Exit status: 0 healthy; 1 degraded (open events, no baseline, a stale watcher, a
    broken seal or chain, a policy file that differs from the sealed one); 2 when the
    chain does not contain the --expect-head digest.

    Example:

        integrity status --json
    """
    from integrity.ops.status import collect
    from integrity.report import dump_json, status_text

    try:
        policy, problem = env.policy, None
    except PolicyError as exc:  # status still reports, from the sealed policy
        policy, problem = None, str(exc)
    report = collect(env.store(), policy, expect_head=expect_head, policy_error=problem)
    if as_json:
        dump_json(report.data, sys.stdout)
    else:
        status_text(report.data, sys.stdout)
    sys.exit(0 if report.healthy else 1)


@cli.command()
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Remove closed events last seen longer ago than this (e.g. 90d).")
@pass_env
def prune(env: Env, older_than: str) -> None:
    """Remove old closed events, leaving a chained checkpoint in the event log.

    Open events are never removed. The hash chain is replaced by a checkpoint that
    names its previous head, followed by the surviving events and approvals, so it
    stays verifiable and the database stays bounded.

    Example:

        integrity prune --older-than 90d
    """
    from integrity.ops.maintenance import prune as prune_events

    removed, head = prune_events(env.store(), older_than)
    click.echo(f"pruned {removed} closed events; event log head {head}")


@cli.group()
def alert() -> None:
    """The policy's alert sinks."""


@alert.command("test")
@pass_env
def alert_test(env: Env) -> None:
    """Send a test alert to every [[alert]] sink of the policy, now.

    Bypasses the outbox and min_severity, so each sink's address, credentials and
    TLS are checked end to end. Exit status: 0 when every sink took it, 1 when one
    failed (each failure is printed with its cause), 2 for a bad policy.

    Example:

        integrity alert test
    """
    from integrity.ops.maintenance import alert_test as probe

    results = probe(env.policy)
    if not results:
        echo(f"{env.policy.source} has no [[alert]] sinks")
        return
    failed = 0
    for name, problem in results:
        echo(f"{name}: " + ("delivered" if problem is None else f"FAILED: {problem}"))
        failed += problem is not None
    sys.exit(1 if failed else 0)
