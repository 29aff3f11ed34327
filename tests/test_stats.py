"""`integrity events --stats` and `--access`: counts from a real SQLite file, in local
time, as a table with bars and as JSON.

Changes are recorded through the store's own API at chosen times (the clock the
store stamps with is frozen per recording, as scheduling tests do): the point is
which bucket a change lands in, not when the test happens to run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from integrity.store import Store
from integrity.store.access import Read
from integrity.store.events import Sighting

VIM = {"pid": 4242, "exe": "/usr/bin/vim.basic", "user": "root", "uid": 0,
       "login_user": "alice", "loginuid": 1000, "cmdline": "vim /etc/x", "comm": "vim"}
DPKG = {"pid": 77, "exe": "/usr/bin/dpkg", "user": "root", "uid": 0,
        "login_user": None, "loginuid": None, "cmdline": "dpkg -i x.deb", "comm": "dpkg"}


@pytest.fixture
def kolkata(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time UTC+05:30: a zone whose hours do not start on UTC hours."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    time.tzset()


@pytest.fixture
def store(run: Cli) -> Iterator[Store]:
    assert run("init").exit_code == 0
    opened = Store(f"sqlite:///{run.db}")
    yield opened
    opened.close()


def record_at(store: Store, when: dt.datetime, path: str,
              actor: dict[str, Any] | None = None, rule: str = "/r",
              kind: str = "modified") -> None:
    """One change recorded as if seen at `when` (naive UTC)."""
    key = os.fsencode(path)
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr("integrity.store.events.utcnow", lambda: when)
        store.events.record([Sighting(key, kind, ("content",), None, None, rule, "high",
                                      "unexplained", actor)], "verify",
                            [(key.replace(b"/", b"\x00"),
                              key.replace(b"/", b"\x00") + b"\x01")])


def stats(run: Cli, *args: str) -> dict[str, Any]:
    result = run("events", "--stats", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def counts(data: dict[str, Any]) -> dict[str, int]:
    return {b["key"]: b["count"] for b in data["buckets"]}


RECENT = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, minute=0, second=0,
                                                  microsecond=0) - dt.timedelta(days=3)


def test_hours_and_weekdays_are_local(run: Cli, store: Store, kolkata: None) -> None:
    base = RECENT.replace(hour=0)
    # 00:40 UTC is 06:10 in Kolkata; 20:10 UTC is 01:40 there, the next day.
    record_at(store, base + dt.timedelta(minutes=40), "/r/a", DPKG)
    record_at(store, base + dt.timedelta(minutes=41), "/r/b", DPKG)
    record_at(store, base + dt.timedelta(hours=20, minutes=10), "/r/c", VIM)
    hours = stats(run, "--by", "hour")
    assert hours["by"] == "hour" and hours["counted"] == "changes" and hours["total"] == 3
    assert [b["key"] for b in hours["buckets"]] == [f"{h:02d}" for h in range(24)]
    assert {k: v for k, v in counts(hours).items() if v} == {"06": 2, "01": 1}
    day = (base + dt.timedelta(hours=6)).weekday()
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    weekdays = counts(stats(run, "--by", "weekday"))
    assert list(weekdays) == names
    assert {k: v for k, v in weekdays.items() if v} == {names[day]: 2,
                                                        names[(day + 1) % 7]: 1}


def test_actor_rule_and_dir(run: Cli, store: Store) -> None:
    for name, actor, rule in (("/r/etc/a", DPKG, "/r"), ("/r/etc/b", DPKG, "/r"),
                              ("/r/etc/sub/c", VIM, "/r/etc/sub"),
                              ("/r/bin/d", None, "/r")):
        record_at(store, RECENT, name, actor, rule)
    actors = stats(run, "--by", "actor")["buckets"]
    assert actors[0] == {"key": "/usr/bin/dpkg as root", "count": 2,
                         "exe": "/usr/bin/dpkg", "user": "root", "login_user": None}
    labels = {b["key"]: b["count"] for b in actors}
    assert labels["/usr/bin/vim.basic as root (login alice)"] == 1
    assert any(k.startswith("(no actor") and v == 1 for k, v in labels.items())
    assert counts(stats(run, "--by", "rule")) == {"/r": 3, "/r/etc/sub": 1}
    assert counts(stats(run, "--by", "dir")) == {"/r/etc": 2, "/r/etc/sub": 1, "/r/bin": 1}


def test_since_and_warnings(run: Cli, store: Store) -> None:
    record_at(store, RECENT - dt.timedelta(days=40), "/r/old")
    record_at(store, RECENT, "/r/new")
    store.events.warn(b"/", "inotify queue overflowed")  # not a change
    assert stats(run, "--by", "rule")["total"] == 1  # default: the last 30 days
    assert stats(run, "--by", "rule", "--since", "60d")["total"] == 2


def test_text_table_has_bars_and_escapes_names(run: Cli, store: Store) -> None:
    record_at(store, RECENT, "/r/evil\x1b[2J/a")
    record_at(store, RECENT, "/r/evil\x1b[2J/b")
    record_at(store, RECENT, "/r/plain/c")
    out = run("events", "--stats", "--by", "dir").stdout
    assert out.startswith("changes by directory since ")
    lines = out.splitlines()[1:]
    assert lines[0].split()[:2] == ["/r/evil\\x1b[2J", "2"] and lines[0].endswith("█" * 40)
    assert lines[1].split()[:2] == ["/r/plain", "1"] and lines[1].endswith("█" * 20)
    assert "\x1b" not in out


def test_verify_feeds_stats(run: Cli, tree: Path) -> None:
    run("init")
    (tree / "a.conf").write_text("changed\n")
    (tree / "sub" / "c.txt").write_text("changed\n")
    run("verify")
    local_hour = f"{dt.datetime.now().hour:02d}"
    assert counts(stats(run, "--by", "hour"))[local_hour] == 2
    assert counts(stats(run, "--by", "dir")) == {str(tree): 1, str(tree / "sub"): 1}


def test_access_records_list_and_count(run: Cli, store: Store) -> None:
    hour = RECENT
    cat = {"pid": 10, "exe": "/usr/bin/cat", "uid": 0, "user": "root",
           "login_user": "bob", "loginuid": 1001, "cmdline": "cat /etc/shadow"}
    new, updated = store.access.fold([
        Read(b"/etc/shadow", hour, "/usr/bin/cat", 0, "/etc/shadow", 3, hour, hour, cat),
        Read(b"/etc/shadow", hour, "/usr/bin/cat", 0, "/etc/shadow", 2, hour, hour, cat)])
    assert len(new) == 1 and updated == []
    new2, updated2 = store.access.fold([
        Read(b"/etc/shadow", hour + dt.timedelta(minutes=5), "/usr/bin/cat", 0,
             "/etc/shadow", 1, hour, hour + dt.timedelta(minutes=5), cat),
        Read(b"/etc/shadow", hour, None, None, "/etc/shadow", 1, hour, hour,
             {"unknown": "process 11 exited before it could be read"})])
    assert updated2 == new and len(new2) == 1
    rows = run.json("events", "--access")
    assert [(r["path"], r["count"], r["kind"]) for r in rows] == [
        ("/etc/shadow", 6, "access"), ("/etc/shadow", 1, "access")]
    assert rows[0]["actor"]["exe"] == "/usr/bin/cat"
    text = run("events", "--access").stdout
    assert "/etc/shadow  opened x6 by /usr/bin/cat (pid 10, user root, login bob)" in text
    opens = stats(run, "--access", "--by", "actor")
    assert opens["counted"] == "opens" and opens["total"] == 7
    assert counts(opens)["/usr/bin/cat as root (login bob)"] == 6
    assert run.json("status")["chain"]["ok"] is True


def test_deleting_an_access_record_is_tampering(run: Cli, store: Store) -> None:
    import sqlite3

    store.access.fold([Read(b"/etc/shadow", RECENT, "/usr/bin/cat", 0, "/etc/shadow", 1,
                            RECENT, RECENT, {"exe": "/usr/bin/cat"})])
    with sqlite3.connect(run.db) as conn:
        conn.execute("DELETE FROM access")
    data = run.json("status")
    assert data["chain"]["ok"] is False
    assert any("access 1: in the ledger but gone" in p for p in data["chain"]["problems"])


def test_bad_usage(run: Cli, store: Store) -> None:
    result = run("events", "--stats", "--by", "color")
    assert result.exit_code == 2 and "--by" in result.stderr
    result = run("events", "--stats", "--open")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    result = run("events", "--stats", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "--since" in result.stderr
