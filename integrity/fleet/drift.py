"""Drift across peers: entries on which a host differs from the majority of its group.

What a single host cannot say: "this host's /usr/bin/ssh differs from its 199 peers".
For every path held by any host of a group, the hosts' current entries are put into
variants (type, content, link target, mode), with "absent" as one more variant; the
variant held by more than half of the group's hosts is the majority, and every host
with another one is reported: `differs` (which of content, mode, type, link),
`missing` (its peers have the path) or `extra` (its peers do not). A path on which no
variant has a majority is reported with every variant. The central store finds the
paths that are not unanimous (integrity/store/central/reads.py); this judges them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from integrity.errors import UsageError
from integrity.paths import display, from_key, key_range
from integrity.record import json_value
from integrity.store.central import VARIANT, Central


def drift(central: Central, group: str | None = None, prefix: str | None = None
          ) -> list[dict[str, Any]]:
    """Drift items (one per path and group), by group then path."""
    if prefix is not None and not prefix.startswith("/"):
        raise UsageError(f"{prefix!r}: PREFIX must be an absolute path")
    within = key_range(os.fsencode(prefix)) if prefix is not None else None
    items: list[dict[str, Any]] = []
    with central.reads.drift() as reader:
        everyone = reader.groups()
        if group is not None:
            if group not in everyone:
                raise UsageError(f"--group {group}: no host with a baseline in that group")
            everyone = {group: everyone[group]}
        for name in sorted(everyone):
            members = everyone[name]
            if len(members) < 2:
                continue
            held = reader.odd_paths(list(members), within)
            hosts = sorted(members.values())
            judged = (_judge(name, key, held[key], hosts) for key in sorted(held))
            # Two paths whose hashes collide are read together and judged apart: keep
            # only those that really differ.
            items += [item for item in judged if item["outliers"]]
    return items


def _state(variant: tuple[Any, ...]) -> dict[str, Any]:
    return {name: json_value(name, value) for name, value in zip(VARIANT, variant)}


def _judge(group: str, key: bytes, held: dict[str, tuple[Any, ...]], hosts: list[str]
           ) -> dict[str, Any]:
    """One path: its majority (if any) and the hosts that differ from it."""
    counts: dict[tuple[Any, ...] | None, int] = defaultdict(int)
    for host in hosts:
        counts[held.get(host)] += 1  # None: the host does not have the path
    top, votes = max(counts.items(), key=lambda item: item[1])
    decided = votes * 2 > len(hosts)
    outliers: list[dict[str, Any]] = []
    for host in hosts:
        mine = held.get(host)
        if decided and mine == top:
            continue
        found: dict[str, Any] = {"host": host}
        if mine is None:
            found["state"] = "missing"
        elif decided and top is None:
            found.update(state="extra", **_state(mine))
        elif decided and top is not None:
            found.update(state="differs", changed=[
                name for name, a, b in zip(VARIANT, mine, top) if a != b], **_state(mine))
        else:
            found.update(state="no majority", **_state(mine))
        outliers.append(found)
    majority: dict[str, Any] | None = None
    if decided:
        majority = ({"absent": True, "hosts": votes} if top is None
                    else {"hosts": votes, **_state(top)})
    return {"group": group, "path": display(from_key(key)), "hosts": len(hosts),
            "majority": majority, "outliers": outliers}
