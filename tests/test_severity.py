"""Severity by when and by whom: off-hours windows raise it, package managers lower it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integrity.errors import PolicyError
from integrity.policy import load, parse
from integrity.ops.seal import SealedIndex
from integrity.ops.verify import EventContext, check_paths, verify
from integrity.policy.severity import Window, WindowError
from integrity.store import Store

from conftest import Cli

SAT_0200 = dt.datetime(2026, 11, 28, 2, 0)   # a Saturday
FRI_1200 = dt.datetime(2026, 11, 27, 12, 0)
FRI_2300 = dt.datetime(2026, 11, 27, 23, 0)
MON_0659 = dt.datetime(2026, 11, 30, 6, 59)
MON_0700 = dt.datetime(2026, 11, 30, 7, 0)


def test_windows_cross_midnight_and_belong_to_the_day_they_start() -> None:
    nights = Window.parse("mon-fri 19:00-07:00")
    assert nights.contains(FRI_2300)
    assert nights.contains(SAT_0200)          # Friday night runs into Saturday
    assert not nights.contains(FRI_1200)
    assert nights.contains(MON_0659) is False  # Sunday night is not a "mon-fri" night
    assert not nights.contains(MON_0700)
    weekend = Window.parse("sat,sun")
    assert weekend.contains(SAT_0200) and not weekend.contains(FRI_2300)
    wrap = Window.parse("sat-mon 00:00-24:00")
    assert wrap.contains(MON_0700) and wrap.contains(SAT_0200) and not wrap.contains(FRI_1200)


@pytest.mark.parametrize("text, fault", [
    ("", "expected"), ("mon-xyz", "days are"), ("25:00-07:00", "not a time"),
    ("mon 07:00-07:00", "empty"), ("at night", "expected"), ("mon 7-9", "expected")])
def test_bad_windows_say_what_is_wrong(text: str, fault: str) -> None:
    with pytest.raises(WindowError, match=fault):
        Window.parse(text)
    with pytest.raises(PolicyError, match=r"^<policy>: rule\[0\]\.off_hours: "):
        parse({"rule": [{"path": "/etc", "off_hours": [text]}]})


@pytest.mark.parametrize("data, key", [
    ({"severity": {"off_hours": "sat"}}, "severity.off_hours"),
    ({"severity": {"bogus": 1}}, "severity.bogus"),
    ({"severity": {"trusted_processes": ["dpkg"]}}, "severity.trusted_processes"),
    ({"severity": {"trusted_severity": "none"}}, "severity.trusted_severity"),
    ({"severity": []}, "severity"),
])
def test_bad_severity_tables_are_refused_naming_the_key(data: dict[str, Any], key: str
                                                         ) -> None:
    with pytest.raises(PolicyError, match=rf"^<policy>: {key}: "):
        parse({**data, "rule": [{"path": "/etc"}]})


def test_judgement_package_manager_wins_over_the_clock() -> None:
    policy = parse({"severity": {"off_hours": ["sat,sun"]},
                    "rule": [{"path": "/etc", "severity": "high"},
                             {"path": "/srv", "severity": "medium",
                              "off_hours_severity": "critical", "trusted_processes": [],
                              "off_hours": ["mon-fri 19:00-07:00"]}]})
    etc, srv = policy.rule_for(b"/etc/x"), policy.rule_for(b"/srv/x")
    assert etc is not None and srv is not None
    judge = etc.judgement.judge
    assert judge("high", None, FRI_1200) == ("high", "unexplained")
    assert judge("high", None, SAT_0200) == ("critical", "unexplained")  # one step up
    dpkg = {"exe": "/usr/bin/dpkg", "cmdline": "dpkg --unpack x.deb", "uid": 0}
    assert judge("high", dpkg, SAT_0200) == ("low", "package-manager")
    # A maintainer script run by dpkg (as a service's user too), and unattended-upgrade
    # (a Python script).
    child = {"exe": "/usr/bin/cp", "uid": 0,
             "ancestors": [{"exe": "/usr/bin/dash", "uid": 0},
                           {"exe": "/usr/bin/dpkg", "uid": 0}]}
    assert judge("high", child, FRI_1200) == ("low", "package-manager")
    assert judge("high", {**child, "uid": 113}, FRI_1200) == ("low", "package-manager")
    upgrade = {"exe": "/usr/bin/python3.11", "uid": 0,
               "cmdline": "/usr/bin/python3 /usr/bin/unattended-upgrade"}
    assert judge("high", upgrade, FRI_1200)[1] == "package-manager"
    # Anyone can run dpkg (`dpkg -x`), or under it: only root's is a package manager.
    for user in ({**dpkg, "uid": 33}, {**dpkg, "uid": None}, {**upgrade, "uid": 1000},
                 {**child, "ancestors": [{"exe": "/usr/bin/dpkg", "uid": 33}]}):
        assert judge("high", user, FRI_1200) == ("high", "unexplained"), user
    vim = {"exe": "/usr/bin/vim.basic", "cmdline": "vim /etc/x"}
    assert judge("high", vim, FRI_1200) == ("high", "unexplained")
    # Any process can write dpkg's name into its own argv; the kernel's exe cannot be
    # chosen. A word counts only for an interpreter, in its script's place.
    for spoof in ({"exe": "/tmp/.x/evil", "cmdline": "/usr/bin/dpkg --unpack x.deb"},
                  {"exe": "/tmp/.x/evil", "cmdline": "/tmp/.x/evil /usr/bin/dpkg"},
                  {"exe": "/usr/bin/python3.11",
                   "cmdline": "python3 -c exec(payload) /usr/bin/unattended-upgrade"},
                  {"exe": "/usr/bin/perl", "cmdline": "perl -e x /usr/bin/dpkg"},
                  {"exe": "/usr/bin/dash", "cmdline": "sh /tmp/x /usr/bin/dpkg"}):
        assert judge("high", spoof, FRI_1200) == ("high", "unexplained"), spoof
    assert judge("high", {"exe": "/usr/bin/python3.11", "uid": 0, "cmdline":
                          "/usr/bin/python3 -E /usr/bin/unattended-upgrade"},
                 FRI_1200)[1] == "package-manager"
    # The rule's own settings replace the policy's: nights, critical, nobody trusted.
    assert srv.judgement.judge("medium", None, SAT_0200) == ("critical", "unexplained")
    assert srv.judgement.judge("medium", dpkg, FRI_1200) == ("medium", "unexplained")


def _policy(write_policy: Callable[..., Path], tree: Path, windows: list[str]) -> Path:
    return write_policy({"path": str(tree), "check": "static", "severity": "medium",
                         "off_hours": windows})


def test_events_carry_the_judged_severity_actor_and_classification(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    always = _policy(write_policy, tree, ["00:00-24:00"])
    cli = Cli(tmp_path / "state" / "integrity.db", always)
    assert cli("init").exit_code == 0
    store = Store(f"sqlite:///{cli.db}")
    try:
        policy = load(always)
        apt = {"pid": 4242, "exe": "/usr/bin/apt-get", "cmdline": "apt-get install x",
               "uid": 0, "user": "root", "loginuid": 1000, "login_user": "alice"}
        actors = {str(tree / "a.conf").encode(): apt}
        context = EventContext(actor_of=actors.get)
        (tree / "a.conf").write_text("by apt\n")
        (tree / "sub" / "c.txt").write_text("by someone\n")
        index = SealedIndex.build(store, policy)
        assert index is not None
        check_paths(store, policy, [str(tree / "a.conf").encode(),
                                    str(tree / "sub" / "c.txt").encode()], index,
                    context=context)
        # A scan cannot know who changed a file, whatever context it is given.
        (tree / "b.bin").write_bytes(b"by scan")
        verify(lambda: store, policy, [str(tree / "b.bin")], parallel=0, source="scan",
               context=context)
        events = {e["path"]: e for e in store.events.list()}
    finally:
        store.close()
    by_apt = events[str(tree / "a.conf")]
    assert by_apt["classification"] == "package-manager" and by_apt["severity"] == "low"
    assert by_apt["actor"] == apt
    unknown = events[str(tree / "sub" / "c.txt")]
    assert unknown["classification"] == "unexplained"
    assert unknown["severity"] == "high"  # medium, raised: the window is always
    assert unknown["actor"] is None
    scanned = events[str(tree / "b.bin")]
    assert scanned["actor"] is None and scanned["severity"] == "high"
    # events --json shows the same to people and scripts.
    listed = {e["path"]: e for e in cli.json("events")}
    assert listed[str(tree / "a.conf")]["actor"]["login_user"] == "alice"
    assert listed[str(tree / "a.conf")]["classification"] == "package-manager"


def test_a_change_outside_the_windows_keeps_the_rule_severity(
        tmp_path: Path, tree: Path, write_policy: Callable[..., Path]) -> None:
    now = dt.datetime.now()
    # A one-hour window twelve hours away from now: never "now".
    start = (now + dt.timedelta(hours=12)).strftime("%H:00")
    end = (now + dt.timedelta(hours=13)).strftime("%H:00")
    policy = _policy(write_policy, tree, [f"{start}-{end}"])
    cli = Cli(tmp_path / "state" / "integrity.db", policy)
    assert cli("init").exit_code == 0
    (tree / "a.conf").write_text("daytime\n")
    assert cli("verify").exit_code == 1
    [event] = [e for e in cli.json("events") if e["path"] == str(tree / "a.conf")]
    assert event["severity"] == "medium" and event["classification"] == "unexplained"
