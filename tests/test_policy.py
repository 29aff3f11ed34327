"""Policy loading and validation: presets, adjustments, excludes, rule lookup."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

import integrity.policy
from integrity.errors import PolicyError
from integrity.policy import default_policy_path, load, parse, parse_check
from integrity.record import PRESETS, Attr


def test_presets_and_adjustments() -> None:
    assert parse_check("static") == PRESETS["static"]
    assert parse_check("static -mtime -ctime +dev") == (
        PRESETS["static"] & ~(Attr.MTIME | Attr.CTIME)) | Attr.DEV
    assert parse_check(["content", "mode"]) == Attr.TYPE | Attr.CONTENT | Attr.MODE
    assert Attr.CONTENT not in parse_check("perms")
    assert Attr.GROWING in parse_check("log")


@pytest.mark.parametrize("rules, key, fragment", [
    ([{"path": "etc"}], "rule[0].path", "absolute"),
    ([{"path": "/etc", "check": "config +mtim"}], "rule[0].check", "'mtim'"),
    ([{"path": "/etc", "severity": "urgent"}], "rule[0].severity", "urgent"),
    ([{"path": "/etc", "exclude": "*.swp"}], "rule[0].exclude", "list"),
    ([{"path": "/etc", "exclude": ["cache/*"]}], "rule[0].exclude", "absolute"),
    ([{"path": "/etc", "recursive": "yes"}], "rule[0].recursive", "true or false"),
    ([{"path": "/etc", "bogus": 1}], "rule[0].bogus", "unknown key"),
    ([{"path": "/etc"}, {"path": "/etc/"}], "rule[1].path", "duplicate"),
    ([], "rule", "at least one"),
])
def test_invalid_rules_name_file_and_key(rules: list[dict[str, object]], key: str,
                                         fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse({"rule": rules}, "/x/policy.toml")
    message = str(info.value)
    assert message.startswith(f"/x/policy.toml: {key}: ")
    assert fragment in message


def test_schedule_and_alert_validation() -> None:
    rule = [{"path": "/etc"}]
    # cron's 1-5 is Monday to Friday; APScheduler, which runs it, would read Tuesday to
    # Saturday: the policy holds the days by name (policy/cron.py).
    assert parse({"rule": rule, "schedule": {"full_scan": "*/15 2-4 * * 1-5"}}).full_scan \
        == "*/15 2-4 * * mon,tue,wed,thu,fri"
    with pytest.raises(PolicyError, match=r"schedule.full_scan: not a 5-field cron"):
        parse({"rule": rule, "schedule": {"full_scan": "nightly"}})
    with pytest.raises(PolicyError, match=r"alert\[0\].type"):
        parse({"rule": rule, "alert": [{"type": "pager"}]})


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[[rule]\npath = '/etc'\n")
    with pytest.raises(PolicyError, match=rf"^{bad}: invalid TOML"):
        load(bad)
    with pytest.raises(PolicyError, match="cannot read policy"):
        load(tmp_path / "missing.toml")


def test_most_specific_rule_wins() -> None:
    policy = parse({"rule": [{"path": "/etc", "severity": "high"},
                             {"path": "/etc/ssh", "severity": "critical", "check": "static"}]})
    assert policy.rule_for(b"/etc/ssh/sshd_config").severity == "critical"  # type: ignore[union-attr]
    assert policy.rule_for(b"/etc/sshd").severity == "high"  # type: ignore[union-attr]
    assert policy.rule_for(b"/etc").severity == "high"  # type: ignore[union-attr]
    assert policy.rule_for(b"/usr/bin/ls") is None


def test_excludes_bare_names_anywhere_and_absolute_globs() -> None:
    policy = parse({"rule": [{"path": "/etc", "exclude": [
        "*.swp", "/etc/mtab", "/etc/cache/*", "/etc/deep/**/tmp"]}]})
    assert not policy.covers(b"/etc/a/b/.x.swp")
    assert not policy.covers(b"/etc/mtab")
    assert policy.covers(b"/etc/mtab2")
    assert not policy.covers(b"/etc/cache/one")
    assert not policy.covers(b"/etc/cache/one/two")  # below an excluded directory
    assert not policy.covers(b"/etc/deep/a/b/tmp")
    assert policy.covers(b"/etc/deep/a/b/tmpx")
    assert policy.covers(b"/etc/passwd")


def test_non_recursive_rule_covers_direct_children_only() -> None:
    policy = parse({"rule": [{"path": "/srv", "recursive": False}]})
    assert policy.covers(b"/srv")
    assert policy.covers(b"/srv/file")
    assert not policy.covers(b"/srv/dir/file")


SHIPPED = str(resources.files("integrity.policies").joinpath("default.toml"))


def test_shipped_default_policy_is_valid() -> None:
    policy = load(SHIPPED)
    paths = {r.name for r in policy.rules}
    assert {"/etc", "/usr/bin", "/usr/sbin", "/etc/ssh", "/etc/sudoers", "/boot"} <= paths
    assert policy.rule_for(b"/etc/ssh/sshd_config").severity == "critical"  # type: ignore[union-attr]
    assert not policy.covers(b"/etc/mtab")


def test_the_system_policy_wins_over_the_shipped_default(tmp_path: Path) -> None:
    """clean_env put the system policy's place under tmp_path: absent, then present."""
    system = Path(integrity.policy.SYSTEM_POLICY)
    assert system.is_relative_to(tmp_path) and not system.exists()
    assert default_policy_path() == SHIPPED
    system.parent.mkdir(parents=True)
    system.write_text('[[rule]]\npath = "/srv"\n')
    assert default_policy_path() == str(system)
    assert [r.name for r in load(default_policy_path()).rules] == ["/srv"]


def test_packages_require_signed() -> None:
    """`[packages] require_signed`: what `approve --package-updates` (the apt hook's
    included) requires; sealed with the baseline like the rules."""
    from integrity.policy.sealed import SEALED_KEYS, differences, sealed_text

    rule = {"path": "/etc"}
    assert not parse({"rule": [rule]}).packages.require_signed
    strict = parse({"rule": [rule], "packages": {"require_signed": True}})
    assert strict.packages.require_signed
    assert "packages" in SEALED_KEYS
    assert differences(sealed_text(strict), sealed_text(parse({"rule": [rule]}))) == \
        ["packages removed"]


@pytest.mark.parametrize("packages, key", [
    ({"require_signed": "yes"}, "packages.require_signed"),
    ({"require_sigend": True}, "packages.require_sigend"),
    (True, "packages"),
])
def test_bad_packages_settings_name_the_key(packages: object, key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse({"rule": [{"path": "/etc"}], "packages": packages}, "p.toml")
    assert str(caught.value).startswith(f"p.toml: {key}: "), caught.value
    assert "\n" not in str(caught.value)
