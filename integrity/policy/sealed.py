"""The part of a policy a baseline's seal covers, and what differs between two.

What is verified is decided by the rules (paths, checks, excludes, severities, when
and by whom), the public key and what package approvals accept (`[packages]`): those
are sealed with the baseline, so an edited policy file can never silently narrow what
is verified. Schedules, alert sinks and the database URL are operational and stay
out of the seal.
"""

from __future__ import annotations

import json
import blake3

from integrity.policy import Policy, parse

#: Top-level policy keys the seal covers.
SEALED_KEYS = ("rule", "severity", "public_key", "packages")


def sealed_text(policy: Policy) -> str:
    """Canonical JSON of the sealed part of a policy (rules in path order)."""
    data = {key: policy.data[key] for key in SEALED_KEYS if key in policy.data}
    if isinstance(data.get("rule"), list):
        data["rule"] = sorted(data["rule"], key=lambda rule: str(rule.get("path", "")))
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sealed_digest(text: str) -> str:
    """The digest of a sealed policy text, as the seal statement holds it."""
    return blake3.blake3(b"integrity-policy-v1\x00" + text.encode()).hexdigest()


def as_sealed(policy: Policy | None, text: str) -> Policy:
    """The policy to verify with: the sealed rules and key, this policy's schedule,
    sinks and database (none of those without a policy file)."""
    if policy is None:
        return parse(json.loads(text), "(sealed policy)")
    data = {k: v for k, v in policy.data.items() if k not in SEALED_KEYS}
    data.update(json.loads(text))
    return parse(data, f"{policy.source} (as sealed)", policy.digest)


def differences(sealed: str, current: str) -> list[str]:
    """What the current policy changes against the sealed one, one phrase per rule
    or key: 'rule /etc: exclude', 'rule /srv added', 'public_key removed'."""
    old, new = json.loads(sealed), json.loads(current)
    found: list[str] = []
    old_rules = {str(r.get("path")): r for r in old.get("rule", [])}
    new_rules = {str(r.get("path")): r for r in new.get("rule", [])}
    for path in sorted(old_rules.keys() | new_rules.keys()):
        before, after = old_rules.get(path), new_rules.get(path)
        if before is None:
            found.append(f"rule {path} added")
        elif after is None:
            found.append(f"rule {path} removed")
        elif before != after:
            keys = sorted(k for k in before.keys() | after.keys()
                          if before.get(k) != after.get(k))
            found.append(f"rule {path}: {', '.join(keys)}")
    for key in SEALED_KEYS[1:]:
        if old.get(key) != new.get(key):
            found.append(f"{key} " + ("added" if key not in old else
                                      "removed" if key not in new else "changed"))
    return found
