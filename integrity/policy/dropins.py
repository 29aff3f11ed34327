"""Drop-ins: every `*.toml` in a `policy.d/` directory beside the policy file.

Operators of AIDE know `aide.conf.d/`: a package, a configuration manager or a person
adds a file instead of editing the one policy. The files are merged in name order onto
the policy file: `[[rule]]` and `[[alert]]` tables are appended (a rule whose path an
earlier file names already is merged into that rule key by key), other tables are
merged key by key, and top-level values are replaced: a later file wins. The merged mapping is then
validated as one policy, and every error is traced back to the file and the key as
that file spells it (`policy.d/20-web.toml: rule[0].severity: ...`).

Validation is whole: a bad drop-in refuses the whole policy, never just itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from integrity.errors import PolicyError

DROPIN_DIR = "policy.d"
#: Arrays of tables that drop-ins append to.
_APPENDED = ("rule", "alert")
#: Tables merged key by key.
_TABLES = ("schedule", "severity", "retention", "content", "metrics", "fleet",
           "scan", "packages")


@dataclass(frozen=True)
class Layer:
    """One file of a policy: its name, decoded tables and raw bytes."""

    name: str
    data: dict[str, Any]
    raw: bytes


#: key as merged ("rule[7]", "schedule.full_scan") -> (file, key as that file has it)
Origins = dict[str, tuple[str, str]]


def shipped_default() -> str:
    """The path of the shipped default policy.

    Asked by every policy load (is this file the shipped default?), so it is the
    package's own directory, not importlib.resources: that import (with tempfile,
    zipfile and shutil) cost `verify` of /etc ~7 ms. integrity runs from a directory
    install, never from a zip, so both give the same path.
    """
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "policies", "default.toml")


def dropin_dir(policy_path: str) -> str:
    """The drop-in directory of a policy file: `policy.d` beside it, except for the
    shipped default, whose drop-ins are the system policy's (/etc/integrity/policy.d)."""
    if os.path.realpath(policy_path) == os.path.realpath(shipped_default()):
        # The shipped default lives inside the package: its drop-ins live where the
        # system policy's would.
        from integrity import policy
        return os.path.join(os.path.dirname(policy.SYSTEM_POLICY), DROPIN_DIR)
    return os.path.join(os.path.dirname(os.path.abspath(policy_path)), DROPIN_DIR)


def dropin_files(policy_path: str) -> list[str]:
    """The drop-ins of a policy file, in the order they are merged (byte order of name).

    Names starting with a dot (editor and package-manager leftovers are not `*.toml`
    anyway) are skipped; a directory that cannot be listed is an error, not silence:
    a drop-in an attacker made unreadable must not quietly narrow the policy.
    """
    directory = dropin_dir(policy_path)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PolicyError(f"{shown(directory)}: cannot list drop-ins: {exc.strerror}") \
            from None
    chosen = sorted(os.fsencode(n) for n in names
                    if n.endswith(".toml") and not n.startswith("."))
    return [os.path.join(directory, os.fsdecode(n)) for n in chosen]


#: Larger than any policy: a drop-in pointing at /dev/zero must not eat the memory.
MAX_POLICY_BYTES = 4 << 20


def shown(name: str) -> str:
    """A file name for a message line: control characters escaped (a drop-in named
    with a newline must not forge a second line)."""
    return "".join(_escape(c) if not c.isprintable() else c for c in name)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def read_layer(name: str) -> Layer:
    """Read and decode one policy file; PolicyError names it.

    Only a regular file is read (opened without blocking, so a FIFO in policy.d
    cannot stall a reload), and only up to MAX_POLICY_BYTES.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PolicyError(f"{shown(name)}: cannot read policy: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"{shown(name)}: cannot read policy: not a regular file")
        if st.st_size > MAX_POLICY_BYTES:
            raise PolicyError(f"{shown(name)}: cannot read policy: larger than "
                              f"{MAX_POLICY_BYTES >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{shown(name)}: cannot read policy: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{shown(name)}: policy is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{shown(name)}: invalid TOML: {exc}") from None
    return Layer(name, data, raw)


def digest(layers: list[Layer]) -> str:
    """One digest over every file and its name: a changed, added or removed drop-in
    is a changed policy (SIGHUP reloads it; the seal sees it)."""
    if len(layers) == 1:
        return hashlib.sha256(layers[0].raw).hexdigest()
    h = hashlib.sha256()
    for layer in layers:
        name = os.fsencode(layer.name)
        h.update(len(name).to_bytes(8, "big") + name)
        h.update(len(layer.raw).to_bytes(8, "big") + layer.raw)
    return h.hexdigest()


def _rule_path(item: Any) -> str | None:
    """The normalized path a rule table names, as the validator will see it."""
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return None
    return normalize_rule_path(item["path"])


def normalize_rule_path(path: str) -> str:
    """A rule path as compared and stored: normalized, one leading slash."""
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


@dataclass
class _Item:
    """One [[rule]] or [[alert]] table as merged, and where its keys came from."""

    table: Any
    file: str
    local: str  # "rule[3]" in that file
    keys: dict[str, tuple[str, str]]  # key -> (file, "rule[0].key" there)


def merge(layers: list[Layer]) -> tuple[dict[str, Any], Origins]:
    """Merge the layers in order into one mapping, remembering where each key came
    from. Only the shape of tables is checked here; values are validated by parse.

    A rule whose path an earlier file names already is merged into that rule key by
    key, the later file's value winning (`severity = "low"` and the path are all a
    drop-in needs to lower one rule); within one file, two rules for one path remain
    a duplicate, which parse refuses.
    """
    merged: dict[str, Any] = {}
    origins: Origins = {}
    appended: dict[str, list[_Item]] = {k: [] for k in _APPENDED}
    for layer in layers:
        for key, value in layer.data.items():
            if key in _APPENDED:
                if not isinstance(value, list):
                    raise PolicyError(f"{shown(layer.name)}: {key}: must be an array of "
                                      f"[[{key}]] tables")
                for index, table in enumerate(value):
                    local = f"{key}[{index}]"
                    keys = ({k: (layer.name, f"{local}.{k}") for k in table}
                            if isinstance(table, dict) else {})
                    earlier = (_earlier_rule(appended[key], table, layer.name)
                               if key == "rule" else None)
                    if earlier is None:
                        appended[key].append(_Item(table, layer.name, local, keys))
                        continue
                    earlier.table = {**earlier.table, **table}
                    earlier.keys.update(keys)
                    earlier.file, earlier.local = layer.name, local
            elif key in _TABLES and isinstance(value, dict):
                table = merged.setdefault(key, {})
                if not isinstance(table, dict):
                    table = merged[key] = {}
                for name, setting in value.items():
                    table[name] = setting
                    origins[f"{key}.{name}"] = (layer.name, f"{key}.{name}")
                origins[key] = (layer.name, key)
            else:
                merged[key] = value
                origins[key] = (layer.name, key)
    for key, items in appended.items():
        if items or any(key in layer.data for layer in layers):
            merged[key] = [item.table for item in items]
            for index, item in enumerate(items):
                origins[f"{key}[{index}]"] = (item.file, item.local)
                for name, where in item.keys.items():
                    origins[f"{key}[{index}].{name}"] = where
    return merged, origins


def _earlier_rule(items: list[_Item], table: Any, file: str) -> _Item | None:
    """The rule of an earlier file with the same path as `table`, if any."""
    path = _rule_path(table)
    if path is None:
        return None
    for item in items:
        if item.file != file and _rule_path(item.table) == path:
            return item
    return None


def locate(origins: Origins | None, key: str, source: str) -> tuple[str, str]:
    """(file, key as written there) of a merged key: the longest known prefix decides
    ("rule[7].exclude" is "rule[0].exclude" of the drop-in that holds rule[7])."""
    if origins:
        cuts = [len(key)] + [i for i in range(len(key) - 1, 0, -1) if key[i] in ".["]
        for cut in cuts:
            found = origins.get(key[:cut])
            if found is not None:
                return found[0], found[1] + key[cut:]
    return source, key
