"""Property-based tests (hypothesis) of the policy parser, check sets, excludes, the
walker's order and the compare function.

Each property is checked against a model written here from SPEC, independently of
the code: preset contents, fnmatch for bare-name globs, sorting by key for the walk,
and "the checked fields that differ" for compare.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from functools import reduce
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from integrity.scan.compare import diff
from integrity.errors import PolicyError
from integrity.paths import to_key
from integrity.policy import Policy, parse, parse_check
from integrity.record import Attr, FileRecord, attr_names
from integrity.scan.walker import WalkEntry, walk

SOURCE = "/etc/integrity/hostile.toml"

# -- models from SPEC ----------------------------------------------------------------

ATTRIBUTES = ("type", "content", "size", "mode", "uid", "gid", "inode", "nlink", "mtime",
              "ctime", "link", "xattrs", "dev")
#: SPEC "Check set" presets, by attribute name ("growing": size may only grow).
PRESET_MODEL = {
    "static": {"type", "content", "size", "mode", "uid", "gid", "inode", "nlink", "link",
               "xattrs", "mtime", "ctime"},
    "config": {"type", "content", "size", "mode", "uid", "gid", "link", "xattrs", "diff"},
    "perms": {"type", "mode", "uid", "gid", "link", "xattrs"},
    "log": {"type", "mode", "uid", "gid", "growing"},
}
TOP_KEYS = {"database", "rule", "schedule", "alert", "public_key", "retention"}
RULE_KEYS = {"path", "check", "severity", "exclude", "recursive", "one_filesystem"}


# -- the policy parser -----------------------------------------------------------------

#: Values TOML can produce (no None, no lone surrogates).
toml_text = st.text(st.characters(codec="utf-8"), max_size=12)
toml_scalar = st.one_of(toml_text, st.integers(-2**63, 2**63 - 1),
                        st.floats(allow_nan=False), st.booleans())
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(toml_text, inner, max_size=3)),
    max_leaves=6)



def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]
           ) -> st.SearchStrategy[Any]:
    """Valid values three times out of four, so validation gets past the first key."""
    return st.one_of(valid, valid, valid, invalid)


glob_piece = st.sampled_from(["*", "?", "**", "[", "]", "[!", "[a-z]", "[z-a]", "[!]",
                              "[]]", "[^x]", "\\", "/", ".", "swp", "etc", "é", "\x00",
                              "-", "!"])
glob = st.lists(glob_piece, min_size=1, max_size=5).map("".join)
check_token = st.builds(lambda sign, name: sign + name, st.sampled_from(["", "+", "-"]),
                        st.sampled_from([*PRESET_MODEL, *ATTRIBUTES, "growing", "bogus",
                                         "", "Static", "+"]))
check_value = mostly(st.lists(check_token, min_size=1, max_size=4).map(" ".join),
                     st.one_of(st.lists(check_token, max_size=4), toml_value))
path_value = mostly(
    st.sampled_from(["/etc", "/usr/bin", "/", "//etc", "/etc/", "/etc/../usr",
                     "/etc/ssh", "/var/www/html"]),
    st.one_of(st.sampled_from(["etc", "", "/\x00", "/etc/\x00x"]),
              toml_text.map(lambda t: "/" + t), toml_value))

def put(draw: st.DrawFn, data: dict[str, Any], key: str, valid: st.SearchStrategy[Any],
        invalid: st.SearchStrategy[Any], present: float = 0.5, bad: float = 0.15) -> None:
    """Maybe set data[key]: a valid value mostly, an invalid one now and then, so
    that validation often gets deep into a policy before it finds something wrong."""
    absent = round((1 - present) * 100)
    invalid_n = max(1, round(present * bad * 100))
    choice = draw(st.sampled_from(["absent"] * absent + ["invalid"] * invalid_n
                                  + ["valid"] * (100 - absent - invalid_n)))
    if choice == "invalid":
        data[key] = draw(invalid)
    elif choice == "valid":
        data[key] = draw(valid)


severity_ok = st.sampled_from(["low", "medium", "high", "critical"])
severity_bad = st.one_of(st.sampled_from(["HIGH", "", "urgent"]), toml_value)


@st.composite
def rule_value(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    put(draw, rule, "path", st.sampled_from(["/etc", "/usr/bin", "/", "//etc", "/etc/",
                                             "/etc/../usr", "/etc/ssh", "/var/www/html"]),
        st.one_of(st.sampled_from(["etc", "", "/\x00", "/etc/\x00x"]),
                  toml_text.map(lambda t: "/" + t), toml_value), present=0.97)
    put(draw, rule, "check", st.lists(check_token, min_size=1, max_size=4).map(" ".join),
        st.one_of(st.lists(check_token, max_size=4), toml_value), bad=0.3)
    put(draw, rule, "severity", severity_ok, severity_bad)
    put(draw, rule, "exclude", st.lists(glob, min_size=1, max_size=4),
        st.one_of(st.lists(st.one_of(glob, toml_value), max_size=3), toml_value),
        present=0.7)
    put(draw, rule, "recursive", st.booleans(), toml_value)
    put(draw, rule, "one_filesystem", st.booleans(), toml_value)
    put(draw, rule, "bogus", toml_value, toml_value, present=0.03)
    return rule


@st.composite
def alert_value(draw: st.DrawFn) -> dict[str, Any]:
    alert: dict[str, Any] = {}
    put(draw, alert, "type", st.sampled_from(["jsonl", "syslog", "webhook", "email",
                                              "exec"]),
        st.one_of(st.just("pager"), toml_value), present=0.9)
    put(draw, alert, "min_severity", severity_ok, severity_bad)
    put(draw, alert, "path", toml_value, toml_value)
    return alert


@st.composite
def policy_value(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    put(draw, data, "rule", st.lists(rule_value(), min_size=1, max_size=3),
        st.one_of(st.lists(st.one_of(rule_value(), toml_value), max_size=3), toml_value),
        present=0.97, bad=0.1)
    put(draw, data, "database", st.just("sqlite:////var/lib/i.db"),
        st.one_of(st.just(""), toml_value))
    put(draw, data, "schedule", st.fixed_dictionaries({}, optional={
        "full_scan": st.sampled_from(["0 3 * * *", "*/5 * * * *", "0 0 * * mon"])}),
        st.one_of(st.fixed_dictionaries({"full_scan": st.one_of(
            st.sampled_from(["0 3 * *", "a b c d e"]), toml_value)}),
            st.fixed_dictionaries({"hourly": toml_value}), toml_value))
    put(draw, data, "alert", st.lists(alert_value(), max_size=2),
        st.one_of(st.lists(st.one_of(alert_value(), toml_value), max_size=2), toml_value))
    put(draw, data, "public_key", st.just("/etc/integrity/key.pub"),
        st.one_of(st.just("key.pub"), toml_value))
    put(draw, data, "retention", st.fixed_dictionaries({}, optional={
        "events": st.sampled_from(["90d", "12h", "2w"])}),
        st.one_of(st.fixed_dictionaries({"events": st.one_of(
            st.sampled_from(["90", "d"]), toml_value)}), toml_value))
    put(draw, data, "verbose", toml_value, toml_value, present=0.03)
    return data


def _key_named(message: str, data: dict[str, Any]) -> str:
    """The top-level key a PolicyError names: "SOURCE: key[...].sub: what is wrong"."""
    assert message.startswith(SOURCE + ": "), f"does not start with the source: {message!r}"
    rest = message[len(SOURCE) + 2:]
    for key in sorted(TOP_KEYS | set(data), key=len, reverse=True):
        if rest.startswith(key) and rest[len(key):len(key) + 1] in (":", "[", "."):
            return key
    raise AssertionError(f"names no key of the policy: {message!r}")


@settings(max_examples=300, deadline=None)
@given(policy_value())
def test_policy_parses_or_fails_with_policy_error_naming_source_and_key(
        data: dict[str, Any]) -> None:
    try:
        policy = parse(data, SOURCE)
    except PolicyError as exc:
        top = _key_named(str(exc), data)
        assert top in TOP_KEYS | set(data), str(exc)
        return
    # No other exception escapes, and what parses is a policy with rules.
    assert isinstance(policy, Policy)
    assert policy.rules
    assert set(data) <= TOP_KEYS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.sampled_from(["/", "a", "b", ".", "\x00", "é", " "]),
                        max_size=8).map(lambda t: "/" + t), min_size=1, max_size=3),
       st.sampled_from(["static", "config"]))
def test_a_parsed_policy_holds_only_usable_rule_paths(paths: list[str], check: str) -> None:
    """Validation is the only gate: a rule path no system call can take (a NUL byte)
    is refused there, naming the key, rather than failing later inside a scan."""
    data = {"rule": [{"path": path, "check": check} for path in paths]}
    try:
        policy = parse(data, SOURCE)
    except PolicyError as exc:
        assert _key_named(str(exc), data) == "rule", str(exc)
        return
    for rule in policy.rules:
        assert rule.path.startswith(b"/")
        assert b"\x00" not in rule.path, f"rule path {rule.path!r} was accepted"
        assert os.path.normpath(rule.path) == rule.path


# -- check sets ------------------------------------------------------------------------

def check_model(tokens: list[str]) -> set[str]:
    """SPEC: a preset or attributes, then +attr / -attr, applied left to right; the
    type is always compared."""
    result: set[str] = set()
    for token in tokens:
        sign, name = (token[0], token[1:]) if token[0] in "+-" else ("+", token)
        named = PRESET_MODEL.get(name, {name})
        result = result | named if sign == "+" else result - named
    return result | {"type"}


valid_token = st.builds(lambda sign, name: sign + name, st.sampled_from(["", "+", "-"]),
                        st.sampled_from([*PRESET_MODEL, *ATTRIBUTES, "growing", "diff"]))


@settings(max_examples=500)
@given(st.lists(valid_token, min_size=1, max_size=6), st.booleans())
def test_check_sets_match_the_model(tokens: list[str], as_list: bool) -> None:
    flags = parse_check(tokens if as_list else " ".join(tokens))
    assert set(attr_names(flags)) == check_model(tokens)


def token_valid(word: str) -> bool:
    name = word[1:] if word[:1] in ("+", "-") else word
    return name in (*PRESET_MODEL, *ATTRIBUTES, "growing", "diff")


@settings(max_examples=300)
@given(st.lists(st.one_of(valid_token, st.sampled_from(["", "+", "-", "nope", "+Static",
                                                          "-+mode", "+-"])),
                min_size=0, max_size=5), st.booleans())
def test_bad_check_sets_are_policy_errors(tokens: list[str], as_list: bool) -> None:
    """Any token that is not a preset or attribute (with at most one sign) is refused
    with a PolicyError naming the key; nothing else is ever raised."""
    words = tokens if as_list else " ".join(tokens).split()
    try:
        flags = parse_check(tokens if as_list else " ".join(tokens), "rule[0].check")
    except PolicyError as exc:
        assert str(exc).startswith("rule[0].check: "), str(exc)
        assert not words or not all(map(token_valid, words)), (tokens, str(exc))
        return
    assert words and all(map(token_valid, words)), (tokens, flags)
    assert set(attr_names(flags)) == check_model(words)


# -- excludes --------------------------------------------------------------------------

NAME_ALPHABET = "abcxyz.-_ 0"
name_text = st.text(NAME_ALPHABET, min_size=1, max_size=6).filter(
    lambda n: n not in (".", ".."))


@st.composite
def bare_glob(draw: st.DrawFn) -> str:
    """A glob without '/': literals, '*', '?', and well-formed [...] / [!...] classes."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["lit", "lit", "star", "any", "class"]))
        if kind == "lit":
            parts.append(draw(st.sampled_from(list("abcxyz.-_0"))))
        elif kind == "star":
            parts.append("*")
        elif kind == "any":
            parts.append("?")
        else:
            members = draw(st.lists(st.sampled_from(list("abcxyz.0")), min_size=1,
                                    max_size=3))
            if draw(st.booleans()):
                low, high = sorted(draw(st.lists(st.sampled_from(list("abcxyz")),
                                                 min_size=2, max_size=2)))
                members.append(f"{low}-{high}")
            negate = "!" if draw(st.booleans()) else ""
            parts.append("[" + negate + "".join(members) + "]")
    return "".join(parts)


@settings(max_examples=500, deadline=None)
@given(st.lists(bare_glob(), min_size=1, max_size=3), name_text,
       st.lists(name_text, max_size=3))
def test_bare_name_excludes_match_the_last_component_like_fnmatch(
        patterns: list[str], name: str, parents: list[str]) -> None:
    policy = parse({"rule": [{"path": "/r", "exclude": patterns}]}, SOURCE)
    rule = policy.rules[0]
    path = "/r/" + "/".join([*parents, name])
    expected = any(fnmatch.fnmatchcase(name, p) for p in patterns)
    assert rule.excludes.match(os.fsencode(path), os.fsencode(name)) == expected, (
        patterns, path)
    # covers() agrees: excluded iff the entry or one of its parents matches.
    chain = [*parents, name]
    hidden = any(fnmatch.fnmatchcase(part, p) for part in chain for p in patterns)
    assert policy.covers(os.fsencode(path)) == (not hidden)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["?", "caf?", "[é]", "*[!a]", "?.conf"]),
       st.sampled_from(["é", "café", "ü.conf", "日", "xé"]))
def test_bare_name_excludes_count_characters_not_bytes(pattern: str, name: str) -> None:
    """Policies are UTF-8 text: '?' and '[...]' stand for one character, as in a
    shell's glob and in fnmatch, also when the character takes several bytes."""
    rule = parse({"rule": [{"path": "/r", "exclude": [pattern]}]}, SOURCE).rules[0]
    assert rule.excludes.match(os.fsencode("/r/" + name), os.fsencode(name)) == \
        fnmatch.fnmatchcase(name, pattern), (pattern, name)


# -- the walker's order ------------------------------------------------------------------

raw_name = st.binary(min_size=1, max_size=8).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b".."))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.dictionaries(raw_name, st.one_of(st.none(), st.sets(raw_name, max_size=4)),
                       min_size=1, max_size=12))
def test_walk_order_is_sorted_by_key(layout: dict[bytes, set[bytes] | None]) -> None:
    """Names (any bytes but '/' and NUL) as files, or as directories of files."""
    with tempfile.TemporaryDirectory(prefix="walk-order-") as tmp:
        root = os.fsencode(tmp)
        expected = [root]
        for name, children in layout.items():
            path = root + b"/" + name
            expected.append(path)
            if children is None:
                with open(path, "wb") as handle:
                    handle.write(name)
                continue
            os.mkdir(path)
            for child in children:
                with open(path + b"/" + child, "wb"):
                    pass
                expected.append(path + b"/" + child)
        policy = parse({"rule": [{"path": tmp}]}, SOURCE)
        walked = [e.path for e in walk(policy) if isinstance(e, WalkEntry)]
    assert walked == sorted(expected, key=to_key)


# -- compare.diff ------------------------------------------------------------------------

#: Each check-set flag and the record field it compares (SPEC's attribute names).
FLAG_FIELDS = {Attr.TYPE: "type", Attr.CONTENT: "content", Attr.SIZE: "size",
               Attr.MODE: "mode", Attr.UID: "uid", Attr.GID: "gid", Attr.INODE: "inode",
               Attr.NLINK: "nlink", Attr.MTIME: "mtime", Attr.CTIME: "ctime",
               Attr.LINK: "link", Attr.XATTRS: "xattrs", Attr.DEV: "dev"}
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["file", "dir", "symlink", "fifo", "socket", "char", "block"]),
    "content": st.sampled_from([None, b"\x01" * 32, b"\x02" * 32]),
    "size": st.sampled_from([0, 1, 4096, 2**40]),
    "mode": st.sampled_from([0o644, 0o755, 0o4755, 0o600]),
    "uid": st.sampled_from([0, 1000, 2**32 - 2]),
    "gid": st.sampled_from([0, 1000]),
    "inode": st.sampled_from([2, 131073]),
    "nlink": st.sampled_from([1, 2]),
    "mtime": st.sampled_from([0, 1_700_000_000_000_000_000, 1_700_000_000_000_000_001]),
    "ctime": st.sampled_from([0, 1_700_000_000_000_000_000]),
    "link": st.sampled_from([None, b"target", b"/etc/shadow"]),
    "xattrs": st.sampled_from([None, b"\x03" * 32]),
    "dev": st.sampled_from([64768, 2049]),
}


@st.composite
def record_pair(draw: st.DrawFn) -> tuple[FileRecord, FileRecord]:
    path = b"/etc/x"
    old = {name: draw(values) for name, values in FIELD_VALUES.items()}
    new = dict(old)
    for name in draw(st.sets(st.sampled_from(list(FIELD_VALUES)))):
        new[name] = draw(FIELD_VALUES[name])
    return FileRecord(path, **old), FileRecord(path, **new)


check_sets = st.sets(st.sampled_from(list(Attr))).map(
    lambda flags: reduce(lambda a, b: a | b, flags, Attr(0)))


@settings(max_examples=1000)
@given(record_pair(), check_sets)
def test_diff_reports_exactly_the_checked_fields_that_differ(
        pair: tuple[FileRecord, FileRecord], attrs: Attr) -> None:
    old, new = pair
    expected = {field for flag, field in FLAG_FIELDS.items()
                if flag in attrs and getattr(old, field) != getattr(new, field)}
    if old.type != new.type:
        expected.add("type")
    if Attr.GROWING in attrs and new.size < old.size:
        expected.add("size")
    changed = diff(old, new, attrs)
    assert len(changed) == len(set(changed)), changed
    assert set(changed) == expected, (attrs, changed)
    # The same answer whatever was asked before (the check-set plan is cached).
    assert set(diff(old, new, attrs)) == expected
    assert diff(old, old, attrs) == ()
