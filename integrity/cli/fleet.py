"""Fleet commands: this host's push, and the admin side over the central database."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from integrity.cli.app import Env, cli, echo, log_to_stderr, pass_env
from integrity.errors import UsageError

if TYPE_CHECKING:
    from integrity.store.central import Central

F = TypeVar("F", bound=Callable[..., Any])


@cli.group()
def fleet() -> None:
    """Many hosts, one PostgreSQL: this host's push, and the admin side.

    `push` runs on a host (its policy's [fleet] table says where to). The admin
    commands take the central database as --url URL or env INTEGRITY_FLEET_URL
    (a password comes from libpq: PGPASSFILE, ~/.pgpass, or client certificates).

    Example:

        integrity fleet status --url postgresql://fleetadmin@central/integrity
    """


def _url_option(func: F) -> F:
    return click.option("--url", envvar="INTEGRITY_FLEET_URL", metavar="URL",
                        help="Central PostgreSQL database (env INTEGRITY_FLEET_URL).")(func)


def _central(url: str | None) -> Central:
    """The central database of --url, closed with the command."""
    from integrity.store.central import Central

    if not url:
        raise UsageError("--url: the central database is needed (or set "
                         "INTEGRITY_FLEET_URL)")
    central = Central(url, application="integrity fleet admin")
    click.get_current_context().call_on_close(central.close)
    return central


@fleet.command("push")
@click.option("--if-configured", is_flag=True,
              help="Do nothing (exit 0) when the policy has no [fleet] table.")
@click.option("--batch", default=1000, show_default=True, metavar="N",
              help="Chain records per transaction.")
@pass_env
def fleet_push(env: Env, if_configured: bool, batch: int) -> None:
    """Push what the central database lacks, once: chain records, the baseline's
    changes, request outcomes and a heartbeat; apply pending approval requests.

    Exit status: 0 pushed; 2 could not (the local spool keeps everything).

    Example:

        integrity fleet push
    """
    from integrity.fleet.push import push_once
    from integrity.fleet.report import push_text

    policy = env.policy
    if policy.fleet is None:
        if if_configured:
            return
        raise UsageError(f"{policy.source}: no [fleet] table: nothing to push to")
    push_text(push_once(env.store(), policy, batch=batch), sys.stdout)


@fleet.command("init")
@_url_option
def fleet_init(url: str | None) -> None:
    """Create or upgrade the central schema, and the roles integrity_admin and
    integrity_host with row-level security. Run as a role that may create roles.

    Example:

        integrity fleet init --url postgresql://postgres@central/integrity
    """
    central = _central(url)
    report = central.admin.init()
    for role in report.roles_created:
        echo(f"created role {role}")
    if report.before == report.after:
        echo(f"fleet schema in {central.name()} is at revision {report.after}")
    else:
        echo(f"fleet schema in {central.name()} upgraded from "
             f"{report.before or '(empty)'} to {report.after}")


@fleet.command("enroll")
@click.argument("host")
@click.option("--group", metavar="G", help="Pin the host's drift group (default: the "
              "group its policy reports).")
@click.option("--password-file", metavar="F",
              help="Write the password into F (created 0600) instead of printing it.")
@click.option("--rotate", is_flag=True, help="Give an enrolled host a new password.")
@_url_option
def fleet_enroll(host: str, group: str | None,
                 password_file: str | None, rotate: bool, url: str | None) -> None:
    """Create HOST's login role (member of integrity_host) with a random password,
    printed once unless --password-file is given.

    Example:

        integrity fleet enroll web1 --group web --password-file web1.pass
    """
    from integrity.fleet.admin import enroll

    password = enroll(_central(url), host, group=group, password_file=password_file,
                      rotate=rotate)
    verb = "new password for" if rotate else "enrolled"
    if password_file:
        echo(f"{verb} {host}; password written to {password_file}")
    else:
        echo(f"{verb} {host}; password (shown once): {password}")


@fleet.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_url_option
def fleet_status(as_json: bool, url: str | None) -> None:
    """One line per host: group, last seen, watcher, open events by severity, root,
    chain. Silent hosts (more than 3 intervals), forked chains and roots changed
    without an approval are flagged.

    Exit status: 0 all healthy; 1 a host is flagged.

    Example:

        integrity fleet status
    """
    from integrity.fleet.report import status_text
    from integrity.fleet.status import status
    from integrity.report import dump_json

    data = status(_central(url))
    if as_json:
        dump_json(data, sys.stdout)
    else:
        status_text(data, sys.stdout)
    sys.exit(0 if data["healthy"] else 1)


@fleet.command("events")
@click.option("--host", metavar="H", help="Only this host's events.")
@click.option("--open", "open_only", is_flag=True, help="Only events still open.")
@click.option("--since", metavar="WHEN", help="Seen since an ISO time or e.g. 2h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_url_option
def fleet_events(host: str | None, open_only: bool, since: str | None,
                 as_json: bool, url: str | None) -> None:
    """Events across hosts, oldest first, each with its host.

    Example:

        integrity fleet events --open --since 1d
    """
    from integrity.fleet.report import events_text
    from integrity.fleet.status import events
    from integrity.report import dump_json
    from integrity.times import parse_since

    rows = events(_central(url), host=host, open_only=open_only,
                  since=parse_since(since) if since else None)
    if as_json:
        dump_json(rows, sys.stdout)
    else:
        events_text(rows, sys.stdout)


@fleet.command("approve")
@click.argument("paths", nargs=-1)
@click.option("--host", required=True, metavar="H", help="The host to approve on.")
@click.option("--all", "approve_all", is_flag=True, help="Every path with an open event.")
@click.option("--reason", metavar="TEXT", help="Why: recorded with the approval.")
@_url_option
def fleet_approve(paths: tuple[str, ...], host: str, approve_all: bool,
                  reason: str | None, url: str | None) -> None:
    """Ask HOST to approve PATHS (or --all) at its next push.

    The host applies the request through its own approval code and reports back (see
    fleet status and events). A request not taken within 24 hours expires.

    Example:

        integrity fleet approve --host web1 /etc/ssh/sshd_config --reason "ticket 4711"
    """
    from integrity.fleet.admin import request_approval

    request = request_approval(_central(url), host, list(paths), approve_all, reason)
    echo(f"request {request}: {host} applies it at its next push")


@fleet.command("drift")
@click.argument("prefix", required=False)
@click.option("--group", metavar="G", help="Only this group (default: every group).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_url_option
def fleet_drift(prefix: str | None, group: str | None, as_json: bool,
                url: str | None) -> None:
    """Entries whose content or mode differs from the majority of the group's hosts
    (and paths only some hosts have), optionally under PREFIX.

    Exit status: 0 no drift; 1 some.

    Example:

        integrity fleet drift --group web /usr/bin
    """
    from integrity.fleet.drift import drift
    from integrity.fleet.report import drift_text
    from integrity.report import dump_json

    items = drift(_central(url), group, prefix)
    if as_json:
        dump_json(items, sys.stdout)
    else:
        drift_text(items, sys.stdout)
    sys.exit(1 if items else 0)


@fleet.command("resolve")
@click.option("--host", required=True, metavar="H", help="The flagged host.")
@click.option("--reason", metavar="TEXT", help="What the investigation found.")
@_url_option
def fleet_resolve(host: str, reason: str | None, url: str | None) -> None:
    """Close HOST's flags after investigating them.

    A forked chain restarts: the host's next record is taken as the new base, and it
    sends its whole baseline again.

    Example:

        integrity fleet resolve --host web1 --reason "restored from backup, INC-12"
    """
    from integrity.fleet.admin import resolve

    done = resolve(_central(url), host, reason)
    if not done.flags and not done.was_forked:
        echo(f"{host}: no open flags")
    for kind, detail in done.flags:
        echo(f"resolved {kind}: {detail}")
    if done.resync_request is not None:
        echo(f"chain restarted; request {done.resync_request} asks {host} to send its "
             "whole baseline")


@fleet.command("monitor")
@click.option("--every", default=15.0, show_default=True, metavar="SECONDS",
              help="Seconds between two rounds.")
@_url_option
@pass_env
def fleet_monitor(env: Env, every: float, url: str | None) -> None:
    """Alert through the policy's [[alert]] sinks when a host goes silent for more
    than 3 intervals, its chain forks, its root changes without an approval, or a
    critical event arrives. Runs until SIGTERM (systemd: integrity-fleet-monitor).

    Example:

        integrity --policy /etc/integrity/monitor.toml fleet monitor
    """
    import signal
    import threading

    from integrity.alerts import build_sinks
    from integrity.fleet.monitor import Monitor
    from integrity.realtime.sdnotify import Notifier

    sinks = build_sinks(env.policy)
    if not sinks:
        raise UsageError(f"{env.policy.source}: no [[alert]] sinks: the monitor would "
                         "have nobody to tell")
    central = _central(url)
    if not env.verbose:
        log_to_stderr()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    notifier = Notifier.from_environ()
    try:
        Monitor(central, sinks, every=every).run(
            stop, ready=lambda: notifier.ready("monitoring the fleet"))
    finally:
        notifier.stopping()
        for sink in sinks:
            sink.close()
    sys.exit(0)
