"""The event log and status, end to end: real trees, a real SQLite database, the real CLI.

Every change `verify` sees becomes one event; while it is open, later sightings of the
same path update that event instead of adding rows; a path that is back to its
baseline state is closed as reverted. `events` shows the history, `status` the health.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integrity.paths import to_key
from integrity.store import Store

from conftest import Cli, one_line, rows

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
#: The keys SPEC requires of every object of `events --json`.
EVENT_KEYS = {"id", "time", "path", "kind", "changed", "source", "severity", "status",
              "classification", "count", "actor"}


def events(run: Cli, *args: str) -> list[dict[str, Any]]:
    """`events --json ARGS`, which must succeed and print a JSON array."""
    result = run("events", *args, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def by_path(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {row["path"]: row for row in rows}
    assert len(found) == len(rows), f"more than one event per path: {rows!r}"
    return found


def verify_json(run: Cli, *args: str, expect: int) -> dict[str, Any]:
    result = run("verify", "--json", *args)
    assert result.exit_code == expect, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def event_rows(db: Path) -> int:
    """How many rows the event table holds (read-only, bypassing the CLI)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM event").fetchone()[0])


def utc_iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- recording --------------------------------------------------------------------------

def test_verify_records_one_open_event_per_change(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    assert events(run) == []
    (tree / "a.conf").write_text("changed\n")
    (tree / "b.bin").unlink()
    (tree / "new.txt").write_text("new\n")
    doc = verify_json(run, expect=1)
    changes = {c["path"]: c for c in doc["changes"]}
    assert {str(tree / "a.conf"), str(tree / "b.bin"), str(tree / "new.txt"),
            str(tree)} == set(changes)

    rows = by_path(events(run))
    assert set(rows) == set(changes)
    assert event_rows(run.db) == len(changes)
    assert len({row["id"] for row in rows.values()}) == len(rows)
    for path, row in rows.items():
        assert EVENT_KEYS <= set(row), EVENT_KEYS - set(row)
        assert row["kind"] == changes[path]["kind"]
        assert row["changed"] == changes[path]["changed"]
        assert (row["source"], row["rule"], row["severity"]) == ("verify", str(tree), "high")
        assert (row["classification"], row["status"], row["count"]) == \
            ("unexplained", "open", 1)
        assert row["actor"] is None  # verify cannot know who made the change
        assert ISO.match(row["time"]), row["time"]
    assert rows[str(tree / "a.conf")]["changed"][:2] == ["content", "size"]
    assert rows[str(tree / "b.bin")]["kind"] == "removed"
    assert rows[str(tree / "new.txt")]["kind"] == "added"
    # The event keeps the baseline's state and the one seen, as verify reported them.
    a_conf = rows[str(tree / "a.conf")]
    assert a_conf["old"] == changes[str(tree / "a.conf")]["old"]
    assert a_conf["new"] == changes[str(tree / "a.conf")]["new"]


def test_the_same_state_seen_again_adds_nothing(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    (tree / "new.txt").write_text("new\n")
    assert run("verify").exit_code == 1
    first = by_path(events(run))
    rows_before = event_rows(run.db)
    for _ in range(2):
        assert run("verify").exit_code == 1
    again = by_path(events(run))
    assert event_rows(run.db) == rows_before
    assert set(again) == set(first)
    for path, row in again.items():
        assert row["id"] == first[path]["id"]
        assert row["count"] == 1, row
        assert row["status"] == "open"
        assert row["last_seen"] >= first[path]["last_seen"]
    # A fast verify of the same state does not count as a new change either.
    assert run("verify", "--fast").exit_code == 1
    assert [r["count"] for r in events(run)] == [1] * len(first)


def test_a_further_change_while_open_updates_the_same_event(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    target = str(tree / "a.conf")
    (tree / "a.conf").write_text("first change\n")
    first_change = {c["path"]: c for c in verify_json(run, expect=1)["changes"]}[target]
    [event] = [r for r in events(run) if r["path"] == target]
    rows = event_rows(run.db)

    (tree / "a.conf").write_text("second change, longer\n")
    second_change = {c["path"]: c for c in verify_json(run, expect=1)["changes"]}[target]
    assert second_change["new"]["content"] != first_change["new"]["content"]
    [updated] = [r for r in events(run) if r["path"] == target]
    assert event_rows(run.db) == rows
    assert updated["id"] == event["id"]
    assert (updated["count"], updated["status"]) == (2, "open")
    assert updated["new"] == second_change["new"]
    assert updated["new"]["content"] == second_change["new"]["content"]
    assert updated["old"]["content"] == first_change["old"]["content"]  # the baseline's
    assert updated["time"] == event["time"]  # first seen

    # Seen again unchanged: still 2.
    assert run("verify").exit_code == 1
    [same] = [r for r in events(run) if r["path"] == target]
    assert same["count"] == 2

    # Removed while open: the same event, now a removal.
    (tree / "a.conf").unlink()
    assert run("verify").exit_code == 1
    [removed] = [r for r in events(run) if r["path"] == target]
    assert (removed["id"], removed["kind"], removed["count"]) == (event["id"], "removed", 3)
    # (the only new row is the directory whose listing changed)
    assert sorted(r["path"] for r in events(run)) == [str(tree), target]


def test_reverting_to_the_baseline_closes_the_event(config_run: Cli, tree: Path) -> None:
    """Under a `config` rule (no inode or times) writing the old bytes back is a revert."""
    run = config_run
    (tree / "a.conf").write_text("changed\n")
    saved = (tree / "sub" / "c.txt").read_bytes()
    mode = (tree / "sub" / "c.txt").stat().st_mode & 0o7777
    (tree / "sub" / "c.txt").unlink()
    assert run("verify").exit_code == 1
    opened = by_path(events(run))
    assert {r["status"] for r in opened.values()} == {"open"}

    (tree / "a.conf").write_text("alpha\n")  # the baseline's bytes again
    (tree / "sub" / "c.txt").write_bytes(saved)
    os.chmod(tree / "sub" / "c.txt", mode)
    assert run("verify").exit_code == 0
    closed = by_path(events(run))
    for path in (str(tree / "a.conf"), str(tree / "sub" / "c.txt")):
        assert closed[path]["id"] == opened[path]["id"]
        assert closed[path]["status"] == "reverted", closed[path]
        assert closed[path]["approval"] is None
    assert events(run, "--open") == []
    assert run("status").exit_code == 0

    # Changed again: a new event; the reverted one stays closed.
    (tree / "a.conf").write_text("changed again\n")
    assert run("verify").exit_code == 1
    rows = [r for r in events(run) if r["path"] == str(tree / "a.conf")]
    assert [(r["status"], r["count"]) for r in rows] == [("reverted", 1), ("open", 1)]
    assert rows[1]["id"] != rows[0]["id"]


def test_verify_of_some_paths_leaves_other_events_alone(config_run: Cli, tree: Path) -> None:
    run = config_run
    (tree / "a.conf").write_text("changed\n")
    assert run("verify").exit_code == 1
    [event] = events(run)
    # A verify limited to another subtree neither reverts nor re-counts the event.
    assert run("verify", str(tree / "sub")).exit_code == 0
    assert events(run) == [event]
    # Reverted, but only a verify that looks at the path may say so.
    (tree / "a.conf").write_text("alpha\n")
    assert run("verify", str(tree / "sub")).exit_code == 0
    assert events(run)[0]["status"] == "open"
    assert run("verify", str(tree / "a.conf")).exit_code == 0
    assert events(run)[0]["status"] == "reverted"


def test_an_event_the_policy_no_longer_covers_is_closed_as_excluded(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    policy = write_policy({"path": str(tree), "check": "config"})
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    (tree / "sub" / "c.txt").write_text("changed\n")
    assert run("verify").exit_code == 1
    # The operator decides a.conf is not worth watching. Until the edited policy is
    # accepted, the sealed one is verified: a.conf still shows, beside the policy
    # change. Once accepted, its event is closed as excluded (the change is still
    # there), not as reverted; c.txt's stays open.
    write_policy({"path": str(tree), "check": "config", "exclude": ["a.conf"]})
    assert run("verify").exit_code == 1
    assert {r["path"]: r["status"] for r in events(run)}[str(tree / "a.conf")] == "open"
    assert run("approve", "--policy").exit_code == 0
    assert run("verify").exit_code == 1
    status = {r["path"]: r["status"] for r in events(run) if r["kind"] != "policy"}
    assert status[str(tree / "a.conf")] == "excluded"
    assert status[str(tree / "sub" / "c.txt")] == "open"


# -- the events command -------------------------------------------------------------------

def test_events_open_and_since(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    (tree / "a.conf").write_text("changed\n")
    (tree / "sub" / "c.txt").write_text("changed too\n")
    assert run("verify").exit_code == 1
    approved = run("approve", str(tree / "sub" / "c.txt"))
    assert approved.exit_code == 0, approved.stderr
    everything = by_path(events(run))
    assert set(everything) == {str(tree / "a.conf"), str(tree / "sub" / "c.txt")}
    assert everything[str(tree / "sub" / "c.txt")]["status"] == "approved"

    assert [r["path"] for r in events(run, "--open")] == [str(tree / "a.conf")]
    for since in ("2h", "7d", "30m", "1w"):
        assert set(by_path(events(run, "--since", since))) == set(everything), since
    assert [r["path"] for r in events(run, "--open", "--since", "2h")] == \
        [str(tree / "a.conf")]

    now = dt.datetime.now(dt.timezone.utc)
    future = utc_iso(now + dt.timedelta(days=1))
    assert events(run, "--since", future) == []
    text = run("events", "--since", future)
    assert (text.exit_code, text.stdout) == (0, "no events\n")
    # An ISO time with an offset is the same instant in UTC.
    hour_ago = (now - dt.timedelta(hours=1)).astimezone(
        dt.timezone(dt.timedelta(hours=5))).isoformat(timespec="seconds")
    assert set(by_path(events(run, "--since", hour_ago))) == set(everything)
    in_an_hour = (now + dt.timedelta(hours=1)).astimezone(
        dt.timezone(dt.timedelta(hours=-7))).isoformat(timespec="seconds")
    assert events(run, "--since", in_an_hour) == []

    # The text form: one line per event, oldest first.
    lines = run("events").stdout.splitlines()
    assert len(lines) == 2
    assert str(tree / "a.conf") in lines[0] and "open" in lines[0]
    assert str(tree / "sub" / "c.txt") in lines[1] and "approved" in lines[1]


@pytest.mark.parametrize("since", ["bogus", "2x", "yesterday", "-3h"])
def test_since_that_is_no_time_exits_2_with_one_line(run: Cli, since: str) -> None:
    assert run("init").exit_code == 0
    for args in (["events", "--since", since], ["events", "--json", "--since", since]):
        result = run(*args)
        assert result.exit_code == 2
        line = one_line(result.stderr)
        assert line.startswith("integrity: ") and since in line
        assert result.stdout == ""


def test_events_json_escapes_non_utf8_paths(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    raw = os.fsencode(tree) + b"/caf\xe9-\xff.conf"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name\n")
    assert run("verify").exit_code == 1
    result = run("events", "--json")
    assert result.exit_code == 0
    assert "\udce9" not in result.stdout and "\udcff" not in result.stdout
    rows = by_path(json.loads(result.stdout))
    escaped = str(tree) + "/caf\\xe9-\\xff.conf"
    assert escaped in rows, list(rows)
    assert rows[escaped]["kind"] == "added"
    assert EVENT_KEYS <= set(rows[escaped])
    # The database keeps the exact bytes.
    with sqlite3.connect(f"file:{run.db}?mode=ro", uri=True) as conn:
        keys = {bytes(k) for (k,) in conn.execute("SELECT key FROM event")}
    assert to_key(raw) in keys
    assert escaped in run("events").stdout
    # A further change to it updates that same event.
    os.unlink(raw)
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name, changed\n")
    assert run("verify").exit_code == 1
    assert by_path(events(run, "--open"))[escaped]["count"] == 2


@pytest.mark.parametrize("command", [["events"], ["events", "--json"], ["status"],
                                     ["status", "--json"]])
def test_without_a_database_exits_2_and_creates_none(run: Cli, command: list[str]) -> None:
    result = run(*command)
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "run 'integrity init'" in line and str(run.db) in line
    assert result.stdout == ""
    assert not run.db.exists()


# -- status -----------------------------------------------------------------------------

def status_json(run: Cli, expect: int) -> dict[str, Any]:
    result = run("status", "--json")
    assert result.exit_code == expect, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_status_after_init_is_healthy(run: Cli) -> None:
    assert run("init").exit_code == 0
    doc = status_json(run, expect=0)
    assert {"baseline", "events", "watcher", "last_scan"} <= set(doc)
    baseline = doc["baseline"]
    assert {"created", "entries", "root"} <= set(baseline)
    assert ISO.match(baseline["created"])
    assert baseline["entries"] == 7
    assert baseline["root"] is None or re.fullmatch(r"[0-9a-f]{64}", baseline["root"])
    assert doc["events"] == {"open": 0, "low": 0, "medium": 0, "high": 0, "critical": 0}
    watcher = doc["watcher"]
    assert (watcher["pid"], watcher["heartbeat"], watcher["alive"]) == (None, None, False)
    assert doc["last_scan"] is None
    text = run("status")
    assert text.exit_code == 0
    assert "7 entries" in text.stdout and "open events: 0" in text.stdout


def test_status_exits_1_with_open_events_and_0_once_approved(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    policy = write_policy({"path": str(tree), "check": "static", "severity": "high"},
                          {"path": str(tree / "sub"), "check": "config",
                           "severity": "critical"},
                          {"path": str(tree / "a.conf"), "check": "config",
                           "severity": "low"})
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    (tree / "sub" / "d.txt").write_text("d\n")
    assert run("init").exit_code == 0
    # Files changed in place: no directory listing changes (whose size some
    # filesystems, tmpfs, would report under the config rule).
    (tree / "a.conf").write_text("changed\n")            # low
    (tree / "sub" / "c.txt").write_text("changed\n")      # critical
    (tree / "sub" / "d.txt").write_text("changed\n")      # critical
    (tree / "b.bin").write_bytes(b"replaced")             # high
    doc = verify_json(run, expect=1)
    assert len(doc["changes"]) == 4

    status = status_json(run, expect=1)
    assert status["events"] == {"open": 4, "low": 1, "medium": 0, "high": 1, "critical": 2}
    scan = status["last_scan"]
    assert scan["source"] == "verify" and ISO.match(scan["time"])
    assert (scan["scanned"], scan["added"], scan["removed"], scan["modified"],
            scan["errors"]) == (8, 0, 0, 4, 0)
    text = run("status")
    assert text.exit_code == 1
    assert "open events: 4 (2 critical, 1 high, 1 low)" in text.stdout

    assert run("approve", str(tree / "sub")).exit_code == 0
    assert status_json(run, expect=1)["events"] == {
        "open": 2, "low": 1, "medium": 0, "high": 1, "critical": 0}
    assert run("approve", "--all").exit_code == 0
    status = status_json(run, expect=0)
    assert status["events"]["open"] == 0
    assert status["baseline"]["entries"] == 8
    assert status["last_scan"] == scan  # approving is not a scan


def test_status_without_a_baseline_exits_1(run: Cli) -> None:
    assert run("db", "upgrade").exit_code == 0
    doc = status_json(run, expect=1)
    assert doc["baseline"] is None
    assert doc["events"]["open"] == 0
    text = run("status")
    assert text.exit_code == 1
    assert "baseline: none (run 'integrity init')" in text.stdout


def test_status_reports_a_baseline_replaced_by_init(run: Cli, tree: Path) -> None:
    assert run("init").exit_code == 0
    shutil.rmtree(tree / "sub")
    assert run("init", "--force").exit_code == 0
    assert status_json(run, expect=0)["baseline"]["entries"] == 5


# -- when a path was last seen as recorded (what approvals date package runs against) --

def test_when_each_changed_path_was_last_seen_as_recorded(run: Cli, tree: Path) -> None:
    """The start of the last scan that covered the path and finished before its change
    was first seen (a scan of other paths does not count), or the last approval of a
    change there, whichever is later: a package run before that made none of it."""
    assert run("init").exit_code == 0
    verify_json(run, expect=0)
    verify_json(run, str(tree / "sub"), expect=0)
    (tree / "a.conf").write_text("changed\n")
    (tree / "sub" / "c.txt").write_text("changed too\n")
    verify_json(run, expect=1)
    whole, sub, _ = [dt.datetime.fromisoformat(started) for (started,) in rows(
        run.db, "SELECT started FROM run WHERE command = 'verify' ORDER BY id")]

    def seen() -> dict[bytes, dt.datetime]:
        store = Store(f"sqlite:///{run.db}")
        try:
            info = store.baselines.require()
            events = store.events.open()
            when = store.events.seen_as_recorded(events, info.id, info.created)
            return {event.path: when[event.id] for event in events}
        finally:
            store.close()

    conf, text = os.fsencode(tree / "a.conf"), os.fsencode(tree / "sub" / "c.txt")
    assert seen() == {conf: whole, text: sub}

    assert run("approve", str(tree / "a.conf"), "--reason", "ticket 1").exit_code == 0
    (approved,), = rows(run.db, "SELECT max(time) FROM approval")
    (tree / "a.conf").write_text("changed again\n")
    verify_json(run, expect=1)
    assert seen() == {conf: dt.datetime.fromisoformat(approved), text: sub}
