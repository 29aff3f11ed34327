"""Maintenance windows (`integrity expect`): real changes inside and outside a window,
real verify runs on a real SQLite file, and the forgeries a root attacker would try."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, database_at


def sql(db: Path, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, args).fetchall()


def events_by_path(run: Cli) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in run.json("events")}


def expect(run: Cli, *args: str) -> dict[str, Any]:
    result = run("expect", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def alerts(tmp_path: Path) -> Path:
    return tmp_path / "alerts.jsonl"


@pytest.fixture
def site(tmp_path: Path, tree: Path, write_policy: Callable[..., Path], alerts: Path) -> Cli:
    policy = write_policy({"path": str(tree), "check": "config", "severity": "high"},
                          extra=f'\n[[alert]]\ntype = "jsonl"\npath = "{alerts}"\n')
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    return run


def settle() -> None:
    """Let the kernel's coarse clock (which stamps ctime) pass the window's start, so
    'after the window opened' is true of the file, not only of the write call."""
    time.sleep(0.05)


def test_change_inside_the_window_is_expected_and_outside_is_not(
        site: Cli, tree: Path) -> None:
    window = expect(site, "--for", "30m", "--reason", "CHG-1234", str(tree / "sub"))
    assert window["paths"] == [str(tree / "sub")] and window["reason"] == "CHG-1234"
    settle()
    (tree / "sub" / "c.txt").write_text("planned\n")
    (tree / "a.conf").write_text("not planned\n")
    assert site("verify").exit_code == 1
    events = events_by_path(site)
    inside, outside = events[str(tree / "sub" / "c.txt")], events[str(tree / "a.conf")]
    assert inside["classification"] == "expected" and inside["severity"] == "low"
    assert inside["ticket"] == "CHG-1234" and inside["window"] == window["id"]
    assert inside["status"] == "open"  # expected is not approved: it waits for a person
    assert outside["classification"] == "unexplained" and outside["severity"] == "high"
    assert outside["ticket"] is None
    text = site("events").stdout
    assert f"[expected, window {window['id']}, ticket CHG-1234]" in text
    # Still open until approved; approving takes it into the baseline.
    assert site("approve", str(tree / "sub" / "c.txt"), "--reason", "CHG-1234").exit_code == 0
    assert events_by_path(site)[str(tree / "sub" / "c.txt")]["status"] == "approved"


def test_a_change_made_before_the_window_opened_is_not_expected(
        site: Cli, tree: Path) -> None:
    """The attacker changes a file, then the admin opens a window for that tree: the
    scan during the window still sees a change older than the window (its ctime)."""
    (tree / "a.conf").write_text("planted before\n")
    settle()
    expect(site, "--for", "1h", "--reason", "CHG-9", str(tree))
    assert site("verify").exit_code == 1
    event = events_by_path(site)[str(tree / "a.conf")]
    assert event["classification"] == "unexplained" and event["severity"] == "high"


def test_no_paths_means_every_protected_path(site: Cli, tree: Path) -> None:
    window = expect(site, "--for", "10m", "--reason", "reboot")
    assert window["paths"] == []
    settle()
    (tree / "b.bin").write_bytes(b"new\n")
    site("verify")
    assert events_by_path(site)[str(tree / "b.bin")]["classification"] == "expected"


def test_cancelled_window_no_longer_expects(site: Cli, tree: Path) -> None:
    window = expect(site, "--for", "1h", "--reason", "CHG-2", str(tree))
    cancelled = site("expect", "--cancel", str(window["id"]))
    assert cancelled.exit_code == 0 and cancelled.stdout.startswith("cancelled window")
    assert site("expect", "--cancel", str(window["id"])).stdout.startswith("already over")
    settle()
    (tree / "a.conf").write_text("after the cancel\n")
    site("verify")
    assert events_by_path(site)[str(tree / "a.conf")]["classification"] == "unexplained"
    assert site.json("status")["windows"] == []


def test_expected_event_changed_again_after_the_window_is_raised_and_alerted(
        site: Cli, tree: Path, alerts: Path) -> None:
    """An open expected event must not hide a later change to the same file."""
    window = expect(site, "--for", "1h", "--reason", "CHG-3", str(tree / "a.conf"))
    settle()
    (tree / "a.conf").write_text("planned\n")
    site("verify")
    first = events_by_path(site)[str(tree / "a.conf")]
    assert first["classification"] == "expected"
    site("expect", "--cancel", str(window["id"]))
    settle()
    (tree / "a.conf").write_text("slipped in afterwards\n")
    site("verify")
    later = events_by_path(site)[str(tree / "a.conf")]
    assert later["id"] == first["id"] and later["count"] == 2
    assert later["classification"] == "unexplained" and later["severity"] == "high"
    assert later["ticket"] is None
    delivered = [json.loads(line) for line in alerts.read_text().splitlines()]
    raised = [a for a in delivered if a["path"] == str(tree / "a.conf")]
    assert [a["severity"] for a in raised] == ["low", "high"]
    assert site.json("status")["chain"]["ok"] is True


def test_status_lists_open_windows(site: Cli, tree: Path) -> None:
    window = expect(site, "--for", "2h", "--reason", "CHG-4 \u202eevil", str(tree))
    data = site.json("status")
    assert [w["id"] for w in data["windows"]] == [window["id"]]
    text = site("status").stdout
    assert f"maintenance window {window['id']}: {tree} until" in text
    assert "\u202e" not in text and "\\u202e" in text  # escaped for the terminal


@pytest.mark.parametrize("opened, forge, problem", [
    (False, "INSERT INTO maintenance_window (created, start, \"end\", reason, paths, "
     "user) VALUES ('2026-01-01 00:00:00', '2026-01-01 00:00:00', "
     "'2099-01-01 00:00:00', 'trust me', '[]', 'root')",
     "window 1: not in the ledger"),
    (True, "UPDATE maintenance_window SET \"end\" = '2099-01-01 00:00:00', paths = '[]'",
     "window 1: differs from its last recorded state"),
])
def test_forged_or_stretched_window_is_not_honoured_and_verify_reports_it(
        site: Cli, tree: Path, opened: bool, forge: str, problem: str) -> None:
    """A root attacker inserts a window over everything, or stretches a real one over
    /etc for years: their implant is still judged as usual, and verify names the
    tampered window."""
    if opened:
        expect(site, "--for", "1m", "--reason", "short", str(tree / "sub"))
    sql(site.db, forge)
    settle()
    (tree / "a.conf").write_text("implant\n")
    report = json.loads(site("verify", "--json").stdout)
    assert any(problem in e["error"] for e in report["errors"]), report["errors"]
    event = events_by_path(site)[str(tree / "a.conf")]
    assert event["classification"] == "unexplained" and event["severity"] == "high"
    assert site("status").exit_code == 1
    assert site.json("status")["chain"]["ok"] is False


def test_bad_input_is_one_line_exit_2(site: Cli, tree: Path, tmp_path: Path) -> None:
    for args, text in [
            (("--for", "0m", "--reason", "x"), "--for"),
            (("--for", "8d", "--reason", "x"), "longest window"),
            (("--for", "soon", "--reason", "x"), "--for"),
            (("--for", "1h", "--reason", "a\nb"), "control characters"),
            (("--for", "1h", "--reason", "  "), "--reason"),
            (("--for", "1h"), "--reason"),
            (("--for", "1h", "--reason", "x", str(tmp_path / "elsewhere")), "elsewhere"),
            (("--cancel", "99"), "no maintenance window 99"),
            (("--cancel", "1", "--for", "1h"), "--cancel")]:
        result = site("expect", *args)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_windows_survive_prune_while_their_events_do(site: Cli, tree: Path) -> None:
    window = expect(site, "--for", "1h", "--reason", "CHG-5", str(tree))
    settle()
    (tree / "a.conf").write_text("planned\n")
    site("verify")
    assert site("prune", "--older-than", "0s").exit_code == 0  # the open event stays
    assert events_by_path(site)[str(tree / "a.conf")]["ticket"] == "CHG-5"
    assert [w["id"] for w in site.json("status")["windows"]] == [window["id"]]
    assert site.json("status")["chain"]["ok"] is True


def test_migration_keeps_an_old_chain_valid(tmp_path: Path, tree: Path,
                                            write_policy: Callable[..., Path]) -> None:
    """Events chained at revision 0007 (before event.window_id existed) still match
    their ledger records after `db upgrade` adds the column."""
    from integrity.store.engine import HEAD

    db = tmp_path / "old.db"
    with database_at(db, "0007"):
        pass
    # Rows chained the way 0007's code chained them: every column of the row.
    import blake3
    content = json.dumps({"id": 1, "key": "00", "kind": "added", "changed": "",
                          "source": "verify", "rule": None, "severity": "low",
                          "classification": "unexplained", "status": "open", "count": 1,
                          "first_seen": "2026-01-01T00:00:00", "old": None, "new": None,
                          "actor": None, "approval_id": None, "evidence": None},
                         sort_keys=True, separators=(",", ":"))
    digest = blake3.blake3(f"{'0' * 64}\x00event\x001\x00".encode() + content.encode()
                           ).hexdigest()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO event (id, key, kind, changed, source, severity, "
                      "classification, status, count, first_seen, last_seen) VALUES "
                      "(1, x'00', 'added', '', 'verify', 'low', 'unexplained', 'open', 1, "
                      "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000')")
        conn.execute("INSERT INTO ledger (time, kind, ref, content, prev, digest) VALUES "
                     "('2026-01-01 00:00:00', 'event', 1, ?, ?, ?)",
                     (content, "0" * 64, digest))
    run = Cli(db, write_policy({"path": str(tree)}))
    assert run("db", "upgrade").exit_code == 0
    assert sql(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    chain = run.json("status")["chain"]
    assert chain["ok"] is True, chain["problems"]
    os.unlink(db)


def test_opening_a_window_is_announced_to_the_sinks_it_would_silence(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    """A window lowers every change under it to low: a sink that takes medium and up
    hears of none of them. Root opening a week-long window over everything, then
    changing what it likes, went unalerted: the opening itself must reach that sink,
    at the highest severity the window silences, saying who, until when and why."""
    alerts = tmp_path / "alerts.jsonl"
    policy = write_policy({"path": str(tree), "check": "config", "severity": "high"},
                          extra=f'\n[[alert]]\ntype = "jsonl"\npath = "{alerts}"\n'
                                'min_severity = "medium"\n')
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    assert run("init").exit_code == 0
    window = expect(run, "--for", "7d", "--reason", "routine")
    settle()
    (tree / "a.conf").write_text("implant\n")
    assert run("verify").exit_code == 1
    [event] = [e for e in run.json("events") if e["path"] == str(tree / "a.conf")]
    assert event["classification"] == "expected" and event["severity"] == "low"
    lines = [json.loads(line) for line in alerts.read_text().splitlines()] \
        if alerts.exists() else []
    [notice] = lines
    assert notice["kind"] == "window" and notice["severity"] == "high"
    assert notice["window"] == window["id"] and notice["ticket"] == "routine"
    assert notice["actor"]["user"] == "root"
