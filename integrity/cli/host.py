"""Commands on the host: the watcher, doctor, signing keys, the apt hook, the database."""

from __future__ import annotations

import sys

import click

from integrity.cli.app import Env, cli, echo, log_to_stderr, pass_env


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
    from integrity.realtime.service import WRITE_PATIENCE_SECONDS, Service

    if not env.verbose:
        log_to_stderr()
    env.policy  # validate before anything starts  # noqa: B018
    service = Service(env.store(busy_timeout=WRITE_PATIENCE_SECONDS),
                      env.policy_path or default_policy_path(),
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
    echo(f"private key {private} (keep it off this host)")
    echo(f"public key {public}")


@key.command("fingerprint")
@click.argument("key_file", metavar="FILE")
def key_fingerprint(key_file: str) -> None:
    """Print a signing key's fingerprint (SHA256:..., as ssh-keygen -l prints it).

    FILE may be the public or the private key. Keep the fingerprint off the host and
    check with `verify --expect-key FINGERPRINT`: a baseline signed by any other key
    is refused, whatever public key the host holds.

    Example:

        integrity key fingerprint /etc/integrity/integrity.key.pub
    """
    from integrity.ops.seal import describe_key

    click.echo(describe_key(key_file))


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

    The hook uses this command's --db and --policy, if given. To have it accept
    only the signed archive's word, set `[packages] require_signed = true` in the
    policy (sealed with the baseline: accept it with `approve --policy`).

    Example:

        integrity apt-hook install
    """
    from integrity import apthook

    target = apthook.install(directory, apthook.render(
        apthook.executable(), env.db_option, env.policy_path))
    echo(f"installed {target}")


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
    echo(f"removed {target}" if target else "no apt hook installed")


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
        echo(f"database {store.name()} is at revision {after}")
    else:
        echo(f"database {store.name()} upgraded from revision "
             f"{before or '(empty)'} to {after}")
