"""Commands on the baseline: build it, verify the live system against it, approve."""

from __future__ import annotations

import sys

import click

from integrity.cli.app import Env, cli, echo, pass_env
from integrity.errors import UsageError
from integrity.paths import display


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
    from integrity.ops.baseline import build_baseline
    from integrity.ops.who import invoking_label
    from integrity.report import make_progress
    from integrity.scan.priority import scan_priority

    policy = env.policy
    progress, shown = make_progress("baseline", env.quiet)
    try:
        with scan_priority(policy.scan):  # [scan] nice and io_class
            result = build_baseline(lambda: env.store(must_exist=False), policy,
                                    force=force, actor=invoking_label(),
                                    progress=progress, sign_key=sign_key)
    finally:
        if shown:
            shown.done()
    for w in result.warnings:
        echo(f"warning: {w.operation} failed for '{display(w.path)}': {w.cause} "
             f"({w.consequence})", err=True)
    echo(f"baseline {result.baseline.id}: {result.baseline.entries} entries from "
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
              help="Refuse (exit 2) a baseline whose root is not this one.")
@click.option("--expect-key", metavar="FINGERPRINT",
              help="Refuse (exit 2) a baseline not signed by this key (SHA256:...).")
@click.option("--expect-head", metavar="DIGEST",
              help="Refuse (exit 2) an event chain that does not contain this head.")
@pass_env
def verify(env: Env, paths: tuple[str, ...], as_json: bool, fast: bool,
           expect_root: str | None, expect_key: str | None,
           expect_head: str | None) -> None:
    """Compare the live trees (or just PATHS) with the baseline.

    The baseline's seal (its entries, the sealed policy, generation and time) is
    checked every time; the --expect options check it against what you keep off
    this host. A policy file that differs from the sealed one is reported (exit 1)
    and the sealed policy is verified, until 'approve --policy'.

    Exit status: 0 no changes, 1 changes or unreadable entries, 2 could not run
    (tampering included). Without --fast every regular file is rehashed, because
    mtime can be forged.

    Example:

        integrity verify /etc/ssh --json
        integrity verify --expect-root 8ccc... --expect-head 41d0...
    """
    from integrity.ops.seal import Pins
    from integrity.ops.verify import verify_and_alert
    from integrity.report import dump_json, make_progress, verify_json, verify_text
    from integrity.scan.priority import scan_priority

    progress, shown = make_progress("verify", env.quiet or as_json)
    try:
        with scan_priority(env.policy.scan):  # [scan] nice and io_class
            verification = verify_and_alert(env.store, env.policy, paths, fast=fast,
                                            progress=progress,
                                            pins=Pins(expect_root, expect_key, expect_head))
    finally:
        if shown:
            shown.done()
    if as_json:
        dump_json(verify_json(verification), sys.stdout)
    else:
        verify_text(verification, sys.stdout)
    for note in verification.notes:
        click.echo(f"warning: {note}", err=True)
    sys.exit(verification.exit_code)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--all", "approve_all", is_flag=True, help="Approve every path with an open event.")
@click.option("--package-updates", is_flag=True,
              help="Approve only what dpkg/rpm vouch for; list what is left open and why.")
@click.option("--require-signed", is_flag=True,
              help="With --package-updates: accept only the signed archive's word "
                   "(a cached .deb in a gpgv-verified apt list).")
@click.option("--policy", "accept_policy", is_flag=True,
              help="Seal the policy file as the baseline's policy (after editing it).")
@click.option("--reason", metavar="TEXT", help="Why: recorded with the approval.")
@click.option("--sign-key", metavar="FILE", help="Ed25519 private key to sign the new root.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@pass_env
def approve(env: Env, paths: tuple[str, ...], approve_all: bool, package_updates: bool,
            require_signed: bool, accept_policy: bool, reason: str | None,
            sign_key: str | None, as_json: bool) -> None:
    """Accept the current state of PATHS (with their subtrees) into the baseline.

    Re-reads only the paths it approves, writes them into the baseline and closes
    their open events, in one transaction, recording who (and the sudo user behind
    them), when and why. --package-updates approves exactly the open changes that
    the package manager's records explain; with --require-signed only a cached .deb
    that an apt list names, that list verified against its signed InRelease with
    keyrings as the baseline recorded them. --policy accepts an edited policy file:
    paths it newly covers are read in, paths it no longer covers are dropped.

    Example:

        integrity approve /etc/ssh/sshd_config --reason "ticket 4711"
        integrity approve --package-updates
        integrity approve --package-updates --require-signed
        integrity approve --policy --reason "CHG-2001: protect /srv/app"
    """
    from integrity.ops.approve import Approver
    from integrity.report import approval_json, approval_text, dump_json

    modes = sum([bool(paths), approve_all, package_updates, accept_policy])
    if modes != 1:
        raise UsageError("approve: name PATHs, or use --all, --package-updates or "
                         "--policy (exactly one of them)")
    if require_signed and not package_updates:
        raise UsageError("approve: --require-signed goes with --package-updates")
    approver = Approver(env.store(), env.policy, reason=reason, sign_key=sign_key)
    if accept_policy:
        outcome = approver.accept_policy()
    elif package_updates:
        outcome = approver.package_updates(require_signed=require_signed)
    elif approve_all:
        outcome = approver.all()
    else:
        outcome = approver.paths(paths)
    if as_json:
        dump_json(approval_json(outcome), sys.stdout)
    else:
        approval_text(outcome, sys.stdout)
