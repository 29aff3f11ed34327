"""Commands on the policy itself: show the effective policy, check a file, add a profile."""

from __future__ import annotations

import os
import sys

import click

from integrity.cli.app import Env, cli, pass_env


@cli.group("policy")
def policy_group() -> None:
    """The policy: what is protected, from which file, and shipped profiles."""


@policy_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_env
def policy_show(env: Env, as_json: bool) -> None:
    """Print the effective policy: the policy file with its drop-ins (policy.d/)
    merged, each rule with the file it came from.

    The text form is TOML that loads as the same policy.

    Example:

        integrity policy show --json
    """
    from integrity.policy.effective import policy_doc, policy_toml
    from integrity.report import dump_json

    if as_json:
        dump_json(policy_doc(env.policy), sys.stdout)
    else:
        click.echo(policy_toml(env.policy), nl=False)


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_env
def policy_check(env: Env, file: str) -> None:
    """Validate FILE without running anything: exit 0 when valid, 2 (with one line
    naming the file and key at fault) when not.

    A FILE in a directory named policy.d is checked as a drop-in: merged, in its
    name's place, onto the policy in use (--policy) and its other drop-ins. Any other
    FILE is checked as a policy file with the drop-ins beside it.

    Example:

        integrity policy check /etc/integrity/policy.d/web-server.toml
    """
    from integrity.policy import default_policy_path, load
    from integrity.policy.dropins import DROPIN_DIR, dropin_files
    from integrity.paths import display

    if os.path.basename(os.path.dirname(os.path.abspath(file))) == DROPIN_DIR:
        main = env.policy_path or default_policy_path()
        name = os.path.basename(file)
        others = [f for f in dropin_files(main) if os.path.basename(f) != name]
        files = sorted([*others, file], key=lambda f: os.fsencode(os.path.basename(f)))
        policy = load(main, files)
        what = f"valid as a drop-in of {display(os.fsencode(main))}"
    else:
        policy = load(file)
        what = "valid"
    extra = len(policy.files) - 1
    click.echo(f"{display(os.fsencode(file))}: {what}: {len(policy.rules)} rules"
               + (f" from {extra + 1} files" if extra else ""))


@policy_group.command("add")
@click.argument("profile")
@click.option("--force", is_flag=True, help="Replace the drop-in if it exists.")
@pass_env
def policy_add(env: Env, profile: str, force: bool) -> None:
    """Write a shipped PROFILE as a drop-in beside the policy (policy.d/PROFILE.toml;
    for the shipped default policy, /etc/integrity/policy.d/).

    Profiles: web-server, container-host, database-server. The policy with the new
    drop-in is validated before anything is written. Exit status: 0 written; 2 for
    an unknown profile, a drop-in that exists already (without --force), or a
    policy the profile would make invalid.

    Example:

        integrity policy add web-server
    """
    from integrity.policy import default_policy_path
    from integrity.policy.profiles import add
    from integrity.paths import display

    added = add(env.policy_path or default_policy_path(), profile, force=force)
    click.echo(f"{'replaced' if added.replaced else 'wrote'} {display(os.fsencode(added.path))}"
               f": profile {profile}, {added.rules} rules")
    click.echo("New trees show as added until approved (integrity approve PATH) or "
               "the baseline is rebuilt (integrity init --force).")
