"""The event log's hash chain: tampering shows in status and verify; prune keeps it
verifiable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from integrity.errors import PolicyError
from integrity.policy import parse
from conftest import Cli


def sql(db: Path, statement: str, *args: object) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, args).rowcount


def status(run: Cli) -> tuple[int, dict[str, object]]:
    result = run("status", "--json")
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def history(run: Cli, tree: Path) -> Cli:
    """A baseline, three changes seen twice, one of them approved."""
    run("init")
    (tree / "a.conf").write_text("one\n")
    (tree / "new").write_text("n\n")
    (tree / "sub" / "c.txt").unlink()
    run("verify")
    (tree / "a.conf").write_text("two\n")
    run("verify")
    assert run("approve", str(tree / "new")).exit_code == 0
    return run


def test_chain_is_intact_after_normal_use(history: Cli) -> None:
    _, data = status(history)
    chain = data["chain"]
    assert isinstance(chain, dict)
    assert chain["ok"] is True and chain["problems"] == [] and chain["rows"] >= 5
    assert len(str(chain["head"])) == 64
    assert history("verify").exit_code == 1  # the open changes, no tampering
    errors = json.loads(history("verify", "--json").stdout)["errors"]
    assert errors == []


@pytest.mark.parametrize("tamper, expected", [
    ("DELETE FROM event WHERE kind = 'removed'", "gone (deleted)"),
    ("UPDATE event SET status = 'approved' WHERE status = 'open'", "(edited)"),
    ("UPDATE approval SET reason = 'nothing to see'", "approval"),
    ("DELETE FROM ledger WHERE seq = 2", "does not follow"),
    ("UPDATE ledger SET content = replace(content, 'open', 'shut') WHERE seq = "
         "(SELECT min(seq) FROM ledger WHERE kind = 'event')",
     "digest does not match"),
    ("INSERT INTO event (key, kind, changed, source, severity, classification, status, "
     "count, first_seen, last_seen) VALUES (x'00', 'added', '', 'verify', 'low', "
     "'unexplained', 'approved', 1, '2026-01-01', '2026-01-01')", "not in the ledger"),
])
def test_tampering_shows_in_status_and_verify(history: Cli, tamper: str,
                                              expected: str) -> None:
    assert sql(history.db, tamper) >= 1
    code, data = status(history)
    chain = data["chain"]
    assert isinstance(chain, dict)
    assert code == 1 and chain["ok"] is False
    assert any(expected in problem for problem in chain["problems"]), chain["problems"]
    text = history("status")
    assert "TAMPERING" in text.stdout
    report = json.loads(history("verify", "--json").stdout)
    assert any(e["path"] == "(event log)" and "tampering" in e["error"]
               for e in report["errors"])


def test_prune_removes_old_closed_events_and_keeps_the_chain(history: Cli) -> None:
    before = json.loads(history("events", "--json").stdout)
    closed = [e for e in before if e["status"] != "open"]
    assert closed and any(e["status"] == "open" for e in before)
    sql(history.db, "UPDATE event SET last_seen = '2020-01-01 00:00:00' "
                    "WHERE status != 'open'")  # age them (last_seen is outside the chain)
    _, data = status(history)
    old_head = data["chain"]["head"]  # type: ignore[index]
    result = history("prune", "--older-than", "90d")
    assert result.exit_code == 0 and f"pruned {len(closed)} closed events" in result.stdout
    after = json.loads(history("events", "--json").stdout)
    assert [e["id"] for e in after] == [e["id"] for e in before if e["status"] == "open"]
    code, data = status(history)
    chain = data["chain"]
    assert isinstance(chain, dict) and chain["ok"] is True
    assert chain["head"] != old_head
    with sqlite3.connect(history.db) as conn:
        checkpoint = conn.execute("SELECT prev, content FROM ledger ORDER BY seq LIMIT 1"
                                  ).fetchone()
    assert checkpoint[0] == old_head and json.loads(checkpoint[1])["previous_head"] == old_head
    # Nothing recent is pruned.
    assert history("prune", "--older-than", "90d").stdout.startswith("pruned 0 ")


def test_prune_refuses_a_broken_chain(history: Cli) -> None:
    sql(history.db, "DELETE FROM event WHERE kind = 'removed'")
    result = history("prune", "--older-than", "1d")
    assert result.exit_code == 2 and "refusing to prune" in result.stderr


def test_retention_policy_is_validated() -> None:
    rule = [{"path": "/etc"}]
    assert parse({"rule": rule, "retention": {"events": "90d"}}).retention == "90d"
    for bad in ({"events": "ninety days"}, {"events": 90}, {"keep": "1d"}):
        with pytest.raises(PolicyError, match="retention"):
            parse({"rule": rule, "retention": bad})
