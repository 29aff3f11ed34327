"""The command group, its shared state and the one error boundary.

`IntegrityGroup.invoke` turns every IntegrityError into a single stderr line and its
exit status; commands never catch errors themselves. Commands live in the modules
beside this one, grouped by what they act on.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from functools import update_wrapper
from typing import TYPE_CHECKING, Any, TypeVar

import click

from integrity import __version__
from integrity.errors import EXIT_ERROR, IntegrityError

if TYPE_CHECKING:
    from integrity.policy import Policy
    from integrity.store import Store

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
        self._policy: Policy | None = None
        self._store: Store | None = None

    @property
    def policy(self) -> Policy:
        """The policy, loaded (and validated whole) on first use."""
        if self._policy is None:
            from integrity.policy import default_policy_path, load
            self._policy = load(self.policy_path or default_policy_path())
        return self._policy

    def db_url(self) -> str:
        from integrity.store import engine
        return self.db_option or self.policy.database or engine.default_url()

    def store(self, *, must_exist: bool = True, check_schema: bool = True,
              busy_timeout: float | None = None) -> Store:
        """The database, opened once (the first caller's options decide).

        A command's writes wait for another process's init or approve (up to 600 s,
        saying so once), then up to 30 s for any other writer. A daemon passes its
        own `busy_timeout` and waits only for that."""
        if self._store is None:
            from integrity.store import Store
            from integrity.store.engine import BASELINE_WAIT, BUSY_TIMEOUT
            self._store = Store(self.db_url(), must_exist=must_exist,
                                check_schema=check_schema,
                                busy_timeout=busy_timeout or BUSY_TIMEOUT,
                                baseline_wait=0.0 if busy_timeout else BASELINE_WAIT)
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



def echo(text: str, err: bool = False) -> None:
    """One line for people, escaped (names and values may carry control characters)."""
    from integrity.paths import escape
    click.echo(escape(text), err=err)


def log_to_stderr() -> None:
    """A daemon's log lines (watch, fleet monitor) on stderr, for the journal, with
    control characters escaped: a file name must not forge a line."""
    from integrity.report import EscapingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    handler.integrity_cli = True  # type: ignore[attr-defined]
    logger = logging.getLogger("integrity")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
