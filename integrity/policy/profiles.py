"""Profiles shipped with the package, and `integrity policy add`, which installs one as
a drop-in.

A profile is an ordinary policy fragment (integrity/policies/profiles/NAME.toml): what
a web server, a container host or a database server adds to the default policy. It is
copied, not referenced, so the operator can edit the copy, and a package upgrade never
changes what a host protects behind its back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from integrity import __version__
from integrity.errors import PolicyError, UsageError
from integrity.policy.dropins import dropin_dir, dropin_files


class DropinExists(UsageError):
    """The drop-in a profile would be written to is there already."""


@dataclass(frozen=True)
class Added:
    """A profile written as a drop-in."""

    profile: str
    path: str
    replaced: bool
    rules: int


def names() -> list[str]:
    """The profiles shipped with this version, by name."""
    folder = resources.files("integrity.policies").joinpath("profiles")
    return sorted(entry.name[:-len(".toml")] for entry in folder.iterdir()
                  if entry.name.endswith(".toml"))


def text(name: str) -> str:
    """A profile's TOML; UsageError (exit 2) names the known ones for an unknown name."""
    known = names()
    if name not in known:
        raise UsageError(f"no profile named {name!r} (known: {', '.join(known)})")
    folder = resources.files("integrity.policies").joinpath("profiles")
    return folder.joinpath(f"{name}.toml").read_text(encoding="utf-8")


def add(policy_path: str, name: str, *, force: bool = False) -> Added:
    """Write profile `name` as the drop-in NAME.toml of the policy at `policy_path`.

    The policy with the new drop-in is validated whole before anything is written,
    so a profile that clashes with the host's policy is refused, not installed. The
    file appears atomically (written beside, then linked in place: an existing
    drop-in is never overwritten without `force`, not even by a concurrent run).
    """
    from integrity.policy import load

    body = (f"# Written by `integrity policy add {name}` (integrity {__version__}):\n"
            f"# the shipped profile, yours to edit. Remove the file to drop it.\n\n"
            + text(name))
    directory = dropin_dir(policy_path)
    target = os.path.join(directory, f"{name}.toml")
    exists = os.path.lexists(target)
    if exists and not force:
        raise DropinExists(f"{target}: exists already; --force replaces it")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    temp = os.path.join(directory, f".{name}.toml.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        files = [f for f in dropin_files(policy_path) if f != target]
        files = sorted([*files, target], key=os.fsencode)
        policy = load(policy_path, [temp if f == target else f for f in files])
        if force:
            os.replace(temp, target)
        else:
            try:
                os.link(temp, target)
            except FileExistsError:
                raise DropinExists(f"{target}: exists already; --force replaces it") \
                    from None
    except PolicyError as exc:
        raise PolicyError(f"profile {name} not added: {str(exc).replace(temp, target)}") \
            from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    _sync_dir(directory)
    ours = sum(1 for rule in policy.rules if rule.origin == temp)
    return Added(name, target, exists, ours)


def _sync_dir(directory: str) -> None:
    """Make the new directory entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
