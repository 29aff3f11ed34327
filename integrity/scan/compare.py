"""Pure comparison of a baseline record with a live one under a check set."""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any, NamedTuple

from integrity.record import Attr, FileRecord, json_value

ADDED, REMOVED, MODIFIED = "added", "removed", "modified"

#: (attribute, name, FileRecord field index) for every comparable attribute.
_FIELDS: tuple[tuple[Attr, str, int], ...] = tuple(
    (attr, attr.name.lower(), FileRecord._fields.index(attr.name.lower()))
    for attr in Attr if attr.name and attr.name.lower() in FileRecord._fields)

_plans: dict[Attr, tuple[Callable[[FileRecord], Any], tuple[tuple[str, int], ...]]] = {}


def _plan(attrs: Attr) -> tuple[Callable[[FileRecord], Any], tuple[tuple[str, int], ...]]:
    """(getter of all checked fields, their names and indexes), cached per check set."""
    plan = _plans.get(attrs)
    if plan is None:
        fields = tuple((name, i) for flag, name, i in _FIELDS if flag in attrs)
        getter = itemgetter(*[i for _, i in fields], 1)  # 1: type, always compared
        plan = _plans[attrs] = (getter, fields)
    return plan


class Change(NamedTuple):
    """An added, removed or modified entry, with the attributes that differ."""

    path: bytes
    kind: str
    changed: tuple[str, ...]
    old: FileRecord | None
    new: FileRecord | None


def diff(old: FileRecord, new: FileRecord, attrs: Attr) -> tuple[str, ...]:
    """Names of the checked attributes that differ (empty when none does).

    A change of type is always reported. `growing` (log files) reports `size` only
    when the file shrank.
    """
    getter, fields = _plan(attrs)
    if getter(old) == getter(new) and (Attr.GROWING not in attrs or new.size >= old.size):
        return ()
    changed = [name for name, i in fields if old[i] != new[i]]
    if old.type != new.type and "type" not in changed:
        changed.insert(0, "type")
    if Attr.GROWING in attrs and new.size < old.size and "size" not in changed:
        changed.append("size")
    return tuple(changed)


def compare(old: FileRecord | None, new: FileRecord | None, attrs: Attr) -> Change | None:
    """The change between a baseline entry and the live one, or None."""
    if old is None:
        assert new is not None
        return Change(new.path, ADDED, (), None, new)
    if new is None:
        return Change(old.path, REMOVED, (), old, None)
    changed = diff(old, new, attrs)
    return Change(new.path, MODIFIED, changed, old, new) if changed else None


def change_states(change: Change) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """JSON-ready (old, new) of a change: the changed attributes of a modification,
    or the main attributes of an added or removed entry."""
    if change.kind == MODIFIED:
        assert change.old is not None and change.new is not None
        return ({n: json_value(n, getattr(change.old, n)) for n in change.changed},
                {n: json_value(n, getattr(change.new, n)) for n in change.changed})
    rec = change.new if change.kind == ADDED else change.old
    assert rec is not None
    state: dict[str, Any] = {"type": rec.type, "size": rec.size,
                             "mode": json_value("mode", rec.mode), "uid": rec.uid,
                             "gid": rec.gid}
    if rec.content is not None:
        state["content"] = rec.content.hex()
    if rec.link is not None:
        state["link"] = json_value("link", rec.link)
    return (state, None) if change.kind == REMOVED else (None, state)
