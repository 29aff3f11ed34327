"""Command line: parse, call the core, print, and map errors to exit statuses.

One error boundary (`main`) turns every IntegrityError into a single stderr line and
its exit status; commands never catch errors themselves.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import traceback
from collections.abc import Callable
from functools import update_wrapper
from typing import Any, TypeVar

import click

from integrity import __version__
from integrity.errors import EXIT_ERROR, IntegrityError, UsageError
from integrity.trust import TrustError

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Env:
    """What every command shares: options, and the policy and store opened lazily."""

    def __init__(self, db: str | None, policy_path: str | None, verbose: int,
                 quiet: bool) -> None:
        self.db_option = db
        self.policy_path = policy_path
        self.verbose = verbose
        self.quiet = quiet
        self._policy: Any = None
        self._store: Any = None

    @property
    def policy(self) -> Any:
        if self._policy is None:
            from integrity.policy import default_policy_path, load
            self._policy = load(self.policy_path or default_policy_path())
        return self._policy

    def db_url(self) -> str:
        from integrity.store.engine import default_url
        return self.db_option or self.policy.database or default_url()

    def store(self, *, must_exist: bool = True, check_schema: bool = True) -> Any:
        if self._store is None:
            from integrity.store.engine import Store
            self._store = Store(self.db_url(), must_exist=must_exist,
                                check_schema=check_schema)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def pass_env(func: F) -> F:
    """Hand the command its Env (sqlite-utils / borg style shared state)."""
    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(func, ctx.obj, *args, **kwargs)
    return update_wrapper(wrapper, func)  # type: ignore[return-value]


def actor() -> str:
    """Who runs us: the login behind sudo as well as the effective user."""
    user = getpass.getuser()
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


class _PipeClosed(Exception):
    """Our output's reader went away (`integrity events | head -1`): not an error, and
    nothing more to say. Raised past click so its context still closes the store."""


class IntegrityGroup(click.Group):
    """The one error boundary: IntegrityError becomes a stderr line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _PipeClosed() from None
        except IntegrityError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except OSError as exc:
            where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
            _fail(ctx, f"{where}{exc.strerror or exc}", EXIT_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line
            from integrity.store.engine import as_database_error

            mapped = as_database_error(exc)
            if mapped is not None:
                _fail(ctx, str(mapped), mapped.exit_code)
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc} "
                       "(run with -vv for the traceback)", EXIT_ERROR)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    from integrity.paths import escape

    env = ctx.obj
    if isinstance(env, Env) and env.verbose > 1:
        traceback.print_exc()
    try:
        # Messages name paths and quote what servers and files said: one line, escaped.
        click.echo(f"integrity: {escape(message)}", err=True)
    except BrokenPipeError:
        raise _PipeClosed() from None
    ctx.exit(code)


@click.group(cls=IntegrityGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version")
@click.option("--db", envvar="INTEGRITY_DB", metavar="URL",
              help="Database URL (env INTEGRITY_DB); overrides the policy's `database`.")
@click.option("--policy", "policy_path", envvar="INTEGRITY_POLICY", metavar="FILE",
              help="Policy file (env INTEGRITY_POLICY); default /etc/integrity/policy.toml "
                   "if it exists, else the shipped default policy.")
@click.option("-v", "--verbose", count=True, help="Log details (why entries are re-read); "
              "-vv adds tracebacks to errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def cli(ctx: click.Context, db: str | None, policy_path: str | None, verbose: int,
        quiet: bool) -> None:
    """integrity: a file integrity monitor for Linux servers.

    Build a baseline of the trees your policy protects, then verify the live system
    against it.

    Example:

        integrity init && integrity verify
    """
    env = Env(db, policy_path, verbose, quiet)
    ctx.obj = env
    ctx.call_on_close(env.close)
    logger = logging.getLogger("integrity")
    for old in [h for h in logger.handlers if getattr(h, "integrity_cli", False)]:
        logger.removeHandler(old)  # repeated in-process runs (tests) add none twice
    if verbose:
        from integrity.report import EscapingFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter("%(message)s"))
        handler.integrity_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    else:
        logger.setLevel(logging.WARNING)


@cli.command()
@click.option("--force", is_flag=True, help="Replace an existing baseline.")
@click.option("--sign-key", metavar="FILE",
              help="Ed25519 private key (from 'integrity key generate') to sign the root.")
@pass_env
def init(env: Env, force: bool, sign_key: str | None) -> None:
    """Build the baseline for every rule of the policy.

    The new baseline replaces the old one atomically at the end: an interrupted
    init leaves the previous baseline in force. Refuses (exit 2) when a baseline
    exists, unless --force.

    Example:

        integrity --policy /etc/integrity/policy.toml init
    """
    from integrity.report import make_progress
    from integrity.ops.verify import build_baseline

    policy = env.policy
    progress, shown = make_progress("baseline", env.quiet)
    try:
        result = build_baseline(lambda: env.store(must_exist=False), policy, force=force,
                                actor=actor(), progress=progress, sign_key=sign_key)
    finally:
        if shown:
            shown.done()
    for w in result.warnings:
        _echo(f"warning: {w.operation} failed for '{_display(w.path)}': {w.cause} "
              f"({w.consequence})", err=True)
    _echo(f"baseline {result.baseline.id}: {result.baseline.entries} entries from "
          f"{policy.source} into {env.store().name()}"
          + (f" ({len(result.warnings)} warnings)" if result.warnings else ""))
    click.echo(f"root {result.baseline.root}"
               + (" (signed)" if result.baseline.signature else ""))


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (SPEC format).")
@click.option("--fast", is_flag=True,
              help="Rehash only files whose size, mtime, ctime or inode changed.")
@click.option("--expect-root", metavar="DIGEST",
              help="Refuse (exit 2) a baseline whose entries do not hash to this root.")
@pass_env
def verify(env: Env, paths: tuple[str, ...], as_json: bool, fast: bool,
           expect_root: str | None) -> None:
    """Compare the live trees (or just PATHS) with the baseline.

    Exit status: 0 no changes, 1 changes or unreadable entries, 2 could not run.
    Without --fast every regular file is rehashed, because mtime can be forged.

    Example:

        integrity verify /etc/ssh --json
    """
    from integrity.alerts import build_sinks
    from integrity.alerts.dispatch import deliver_after_scan
    from integrity.store.events import EventContext
    from integrity.store.outbox import routes_of
    from integrity.report import dump_json, make_progress, verify_json, verify_text
    from integrity.ops.verify import exit_code, verify as run_verify

    policy = env.policy
    sinks = build_sinks(policy)
    if expect_root or policy.public_key:
        from integrity.trust import check_baseline
        check_baseline(env.store(), policy, expect_root)
    progress, shown = make_progress("verify", env.quiet or as_json)
    try:
        result = run_verify(env.store, policy, paths, fast=fast, progress=progress,
                            context=EventContext(routes=routes_of(sinks)))
    finally:
        if shown:
            shown.done()
    deliver_after_scan(env.store(), sinks)
    if as_json:
        dump_json(verify_json(result), sys.stdout)
    else:
        verify_text(result, sys.stdout)
    sys.exit(exit_code(result))


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--all", "approve_all", is_flag=True, help="Approve every path with an open event.")
@click.option("--package-updates", is_flag=True,
              help="Approve only what dpkg/rpm vouch for; list what is left open and why.")
@click.option("--reason", metavar="TEXT", help="Why: recorded with the approval.")
@click.option("--sign-key", metavar="FILE", help="Ed25519 private key to sign the new root.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@pass_env
def approve(env: Env, paths: tuple[str, ...], approve_all: bool, package_updates: bool,
            reason: str | None, sign_key: str | None, as_json: bool) -> None:
    """Accept the current state of PATHS (with their subtrees) into the baseline.

    Re-reads only the paths it approves, writes them into the baseline and closes
    their open events, in one transaction, recording who (and the sudo user behind
    them), when and why. --package-updates approves exactly the open changes that
    the package manager's records explain.

    Example:

        integrity approve /etc/ssh/sshd_config --reason "ticket 4711"
        integrity approve --package-updates
    """
    from integrity.ops.approve import Approver
    from integrity.report import approval_json, approval_text, dump_json

    modes = sum([bool(paths), approve_all, package_updates])
    if modes != 1:
        raise UsageError("approve: name PATHs, or use --all, or --package-updates "
                         "(exactly one of them)")
    approver = Approver(env.store(), env.policy, reason=reason, sign_key=sign_key)
    if package_updates:
        outcome = approver.package_updates()
    elif approve_all:
        outcome = approver.all()
    else:
        outcome = approver.paths(paths)
    if as_json:
        dump_json(approval_json(outcome), sys.stdout)
    else:
        approval_text(outcome, sys.stdout)


@cli.command()
@click.option("--open", "open_only", is_flag=True, help="Only events still open.")
@click.option("--since", metavar="WHEN", help="Seen since an ISO time or e.g. 2h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (SPEC format).")
@pass_env
def events(env: Env, open_only: bool, since: str | None, as_json: bool) -> None:
    """Show the event history: every change seen, and what became of it.

    Example:

        integrity events --open --since 7d
    """
    from integrity.store.events import EventLog, parse_since
    from integrity.report import dump_json, events_text

    rows = EventLog(env.store()).events(
        open_only=open_only, since=parse_since(since) if since else None)
    if as_json:
        dump_json(rows, sys.stdout)
    else:
        events_text(rows, sys.stdout)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (SPEC format).")
@pass_env
def status(env: Env, as_json: bool) -> None:
    """Baseline size and age, open events by severity, watcher and last scan.

    Exit status: 0 healthy; 1 degraded (open events, no baseline, a stale watcher).

    Example:

        integrity status --json
    """
    from integrity.report import dump_json, status_text
    from integrity.ops.status import collect

    report = collect(env.store())
    if as_json:
        dump_json(report.data, sys.stdout)
    else:
        status_text(report.data, sys.stdout)
    sys.exit(0 if report.healthy else 1)


@cli.command()
@pass_env
def watch(env: Env) -> None:
    """Run the realtime watcher in the foreground (systemd Type=notify).

    Watches every protected directory with inotify and re-checks just the paths
    behind each event; a catch-up scan at start reports what changed while it was
    down, and the policy's [schedule] full_scan runs a full scan. SIGHUP reloads the
    policy (a bad one is refused), SIGTERM stops it.

    Example:

        integrity watch
    """
    from integrity.realtime.sdnotify import Notifier
    from integrity.policy import default_policy_path
    from integrity.realtime.service import Service

    if not env.verbose:
        from integrity.report import EscapingFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
        handler.integrity_cli = True  # type: ignore[attr-defined]
        logger = logging.getLogger("integrity")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    env.policy  # validate before anything starts  # noqa: B018
    service = Service(env.store(), env.policy_path or default_policy_path(),
                      notifier=Notifier.from_environ())
    sys.exit(service.run())


@cli.command()
@pass_env
def doctor(env: Env) -> None:
    """Check this host for the policy: inotify limits against the watches it needs
    (and which processes hold watches already), filesystems inotify cannot see,
    missing rule paths and permissions, and whether fanotify can name the writers.

    Exit status: 0 all good; 1 with advice.

    Example:

        integrity doctor
    """
    from integrity.doctor import diagnose, render

    diagnosis = diagnose(env.policy, database=env.db_url())
    click.echo(render(diagnosis), nl=False)
    sys.exit(diagnosis.exit_code)


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
    from integrity.store.events import parse_since
    from integrity.store.ledger import check, prune as prune_events

    report = check(env.store())
    if not report.ok:
        raise TrustError("event log hash chain is broken; refusing to prune evidence: "
                         + report.problems[0])
    removed, head = prune_events(env.store(), parse_since(older_than))
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
    import socket

    from integrity.alerts import build_sinks
    from integrity.alerts.dispatch import probe_sinks

    sinks = build_sinks(env.policy)
    if not sinks:
        _echo(f"{env.policy.source} has no [[alert]] sinks")
        return
    failed = 0
    for name, problem in probe_sinks(sinks, socket.gethostname()):
        _echo(f"{name}: " + ("delivered" if problem is None else f"FAILED: {problem}"))
        failed += problem is not None
    sys.exit(1 if failed else 0)


@cli.group()
def key() -> None:
    """Signing keys for the baseline root."""


@key.command("generate")
@click.argument("private_key", metavar="FILE")
def key_generate(private_key: str) -> None:
    """Write a new Ed25519 key pair: FILE (private, mode 0600) and FILE.pub.

    Keep the private key off the host and sign with `init --sign-key` and
    `approve --sign-key`; put `public_key = "/path/FILE.pub"` in the policy so that
    verify and watch refuse a baseline the key did not sign.

    Example:

        integrity key generate /root/integrity-signing.key
    """
    from integrity.trust import generate_keypair

    private, public = generate_keypair(private_key)
    _echo(f"private key {private} (keep it off this host)")
    _echo(f"public key {public}")


@cli.group("apt-hook")
def apt_hook() -> None:
    """The opt-in apt hook that approves package updates after every dpkg run."""


@apt_hook.command("install")
@click.option("--dir", "directory", default="/etc/apt/apt.conf.d", show_default=True,
              help="apt configuration directory.")
@pass_env
def apt_hook_install(env: Env, directory: str) -> None:
    """Install a DPkg::Post-Invoke hook: after apt runs dpkg, changes are recorded
    (verify --fast) and those the packages vouch for are approved; the rest stay
    open and are logged to syslog (tag integrity-apt).

    The hook uses this command's --db and --policy, if given.

    Example:

        integrity apt-hook install
    """
    from integrity import apthook

    target = apthook.install(directory, apthook.render(
        apthook.executable(), env.db_option, env.policy_path))
    _echo(f"installed {target}")


@apt_hook.command("remove")
@click.option("--dir", "directory", default="/etc/apt/apt.conf.d", show_default=True,
              help="apt configuration directory.")
def apt_hook_remove(directory: str) -> None:
    """Remove the apt hook.

    Example:

        integrity apt-hook remove
    """
    from integrity import apthook

    target = apthook.remove(directory)
    _echo(f"removed {target}" if target else "no apt hook installed")


@apt_hook.command("show")
@pass_env
def apt_hook_show(env: Env) -> None:
    """Print the snippet `install` would write.

    Example:

        integrity apt-hook show
    """
    from integrity import apthook

    click.echo(apthook.render(apthook.executable(), env.db_option, env.policy_path), nl=False)


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@pass_env
def upgrade(env: Env) -> None:
    """Apply schema migrations to the database (creating it if needed).

    Example:

        integrity db upgrade
    """
    store = env.store(must_exist=False, check_schema=False)
    before, after = store.upgrade()
    if before == after:
        _echo(f"database {store.name()} is at revision {after}")
    else:
        _echo(f"database {store.name()} upgraded from revision "
              f"{before or '(empty)'} to {after}")


def _display(path: bytes) -> str:
    from integrity.paths import display
    return display(path)


def _echo(text: str, err: bool = False) -> None:
    """One line for people, escaped (names and values may carry control characters)."""
    from integrity.paths import escape
    click.echo(escape(text), err=err)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        try:
            cli.main(args=argv, prog_name="integrity")
        finally:
            # What is still buffered is written now, while a closed pipe can still
            # end us quietly, not at interpreter exit (which would print a traceback).
            sys.stdout.flush()
    except (BrokenPipeError, _PipeClosed):
        _end_on_closed_pipe()


def _end_on_closed_pipe() -> None:
    """End as `cat` or `grep` do when the reader goes away: by SIGPIPE, silently, so
    a shell sees 141 (with pipefail, a failure) and never a status of ours that means
    "no changes"."""
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the dead pipe
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # only if SIGPIPE could not end us
