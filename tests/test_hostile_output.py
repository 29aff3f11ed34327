"""What an intruder can make integrity print: issue 11, rows 12, 18 and 19.

Anyone who can create a file in a protected tree chooses its name, and a name may hold
a newline, ESC and OSC sequences, C1 controls and bytes that are not UTF-8. Every
human-readable output (reports, logs, mail, chat, syslog, the apt hook's lines) must
show them escaped, so no name can forge a line ("Removed (0):"), move the cursor or
retitle a terminal; JSON keeps them exact. Real processes, sockets and servers
throughout: the CLI as a child process where pipes and signals matter, a real datagram
socket for syslog, a real HTTP peer for chat webhooks, util-linux `logger` for the
apt hook's lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, Receiver
from integrity.alerts import build_sinks
from integrity.policy import load

#: A name that tries everything at once: a forged report section, a forged path line,
#: an OSC window title, a screen clear, a C1 CSI, a bidi override, a non-UTF-8 byte.
EVIL = (b"evil\n\nRemoved (0):\n  sshd_config  content\x1b]0;owned\x07\x1b[2J"
        b"\xc2\x9b1A\xe2\x80\xaecod.exe\xff")
#: What no human-readable output may contain raw.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")


#: How people must see it: each control character, the CSI, the override and the
#: undecodable byte as an escape, everything else as it is.
ESCAPED = ("evil\\x0a\\x0aRemoved (0):\\x0a  sshd_config  content\\x1b]0;owned\\x07"
           "\\x1b[2J\\x9b1A\\u202ecod.exe\\xff")


def assert_clean(text: str) -> None:
    """No control character but the line ends, and no line a name forged."""
    assert not RAW.search(text), repr(text)
    lines = text.splitlines()
    assert "Removed (0):" not in lines, lines
    assert not any(line.startswith("  sshd_config") for line in lines), lines


def python_cli(db: Path, policy: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "integrity", "--db", f"sqlite:///{db}", "--policy",
            str(policy), "-q", *args]


@pytest.fixture
def evil(run: Cli, tree: Path) -> Path:
    """The baseline of `tree`, then a file with the evil name added to it."""
    assert run("init").exit_code == 0
    path = os.fsencode(tree) + b"/" + EVIL
    with open(path, "wb") as handle:
        handle.write(b"planted\n")
    return Path(os.fsdecode(path))


# -- row 12: every human-readable output --------------------------------------------------

def test_verify_text_escapes_a_hostile_name_and_json_keeps_it_exact(
        run: Cli, evil: Path) -> None:
    result = run("verify")
    assert result.exit_code == 1
    assert_clean(result.stdout)
    assert any(line.startswith(f"  {evil.parent}/{ESCAPED}  file")
               for line in result.stdout.splitlines()), result.stdout
    assert "\\x0aRemoved (0):\\x0a" in result.stdout and "\\x1b]0;owned\\x07" in result.stdout
    assert "\\x9b1A" in result.stdout and "\\u202e" in result.stdout
    assert "\\xff" in result.stdout
    doc = json.loads(run("verify", "--json").stdout)
    [change] = [c for c in doc["changes"] if c["kind"] == "added"]
    # JSON: exactly the name, control characters included (the non-UTF-8 byte as \xff).
    assert change["path"] == os.fsencode(evil).decode("utf-8", "backslashreplace")
    assert "\n\nRemoved (0):\n" in change["path"] and "\x1b]0;owned\x07" in change["path"]


def test_approve_events_and_status_text_escape_it(run: Cli, evil: Path,
                                                  tmp_path: Path) -> None:
    assert run("verify").exit_code == 1
    events = run("events")
    assert events.exit_code == 0
    assert_clean(events.stdout)
    # One line per event (the name's and its directory's), however many it spells.
    assert ESCAPED in events.stdout
    assert len(events.stdout.splitlines()) == len(run.json("events"))
    approved = run("approve", "--all", "--reason", "ticket\n\x1b[2J4711")
    assert approved.exit_code == 0, approved.output
    assert_clean(approved.stdout)
    assert f"approved added {evil.parent}/{ESCAPED}" in approved.stdout.splitlines()
    # status names the policy a baseline came from: a hostile policy file name too.
    policy = tmp_path / "pol\n\x1b]0;x\x07icy.toml"
    shutil.copy(run.policy, policy)
    assert run("init", "--force", policy=policy).exit_code == 0
    status = run("status", policy=policy)
    assert_clean(status.stdout)
    assert "pol\\x0a\\x1b]0;x\\x07icy.toml" in status.stdout


def test_verbose_log_lines_escape_it(run: Cli, evil: Path) -> None:
    """-v logs why entries are re-read, naming them: the same escaping as reports
    (journald splits the daemon's stderr on newlines)."""
    assert run("verify").exit_code == 1
    assert run("approve", "--all").exit_code == 0
    evil.write_bytes(b"changed after approval\n")
    result = run("-v", "verify", "--fast")
    assert result.exit_code == 1
    assert ESCAPED in result.stderr
    assert_clean(result.stderr)


def test_error_lines_escape_it(run: Cli, evil: Path, tmp_path: Path) -> None:
    """The one error line (here: a path outside every rule) quotes what it was given."""
    outside = os.fsdecode(os.fsencode(tmp_path) + b"/" + EVIL)
    result = run("verify", outside)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert_clean(result.stderr)
    assert ESCAPED in result.stderr


def test_doctor_text_escapes_rule_paths(tmp_path: Path, write_policy: Any) -> None:
    name = EVIL.removesuffix(b"\xff")  # a policy is UTF-8 text
    policy = write_policy({"path": f"{tmp_path}/{name.decode()}"})
    run = Cli(tmp_path / "state" / "integrity.db", policy)
    result = run("doctor")
    assert result.exit_code in (0, 1), result.output  # an absent rule path is listed
    assert_clean(result.stdout)
    shown = ESCAPED.removesuffix("\\xff")
    assert f"        {tmp_path}/{shown}\n" in result.stdout


def _event(path: str, **fields: Any) -> dict[str, Any]:
    event = {"id": 7, "time": "2024-05-01T10:00:00Z", "last_seen": "2024-05-01T10:00:00Z",
             "path": path, "kind": "added", "changed": [], "source": "realtime",
             "rule": "/etc", "severity": "high", "status": "open",
             "classification": "unexplained", "count": 1,
             "actor": {"pid": 9, "exe": "/tmp/\x1b]0;x\x07", "uid": 0, "user": "root",
                       "loginuid": None, "login_user": None},
             "old": None, "new": {"type": "file", "target": "\x1b[2J\n"},
             "approval": None, "evidence": None}
    event.update(fields)
    return event


def _sinks(tmp_path: Path, *tables: str) -> list[Any]:
    policy = tmp_path / "alerts.toml"
    policy.write_text('[[rule]]\npath = "/etc"\n\n' + "\n".join(tables))
    return build_sinks(load(policy))


def test_mail_text_escapes_it(tmp_path: Path) -> None:
    [sink] = _sinks(tmp_path, '[[alert]]\ntype = "email"\nhost = "127.0.0.1"\n'
                              'from = "fim@h"\nto = ["ops@h"]\n')
    path = os.fsencode("/etc/").decode() + os.fsdecode(EVIL)
    for events in ([_event(path)], [_event(path), _event(path, id=8, severity="low",
                                                         classification="\x1b[31mx")]):
        message = sink.message(events)
        body = message.get_content()
        assert_clean(body)
        assert ESCAPED in body
        assert not RAW.search(str(message["Subject"])), message["Subject"]


def test_chat_texts_escape_it(tmp_path: Path, receiver: Receiver) -> None:
    slack, teams = _sinks(
        tmp_path,
        f'[[alert]]\ntype = "webhook"\nformat = "slack"\nurl = "{receiver.url}"\n',
        f'[[alert]]\ntype = "webhook"\nformat = "teams"\nurl = "{receiver.url}"\n')
    path = "/etc/" + os.fsdecode(EVIL)
    slack.deliver([_event(path), _event(path, id=8)])
    teams.deliver([_event(path)])
    posted_slack, posted_teams = receiver.bodies
    assert_clean(posted_slack["text"].replace("\n", " "))
    assert "\\x1b]0;owned\\x07" in posted_slack["text"]
    for key in ("title", "summary", "text"):
        assert not RAW.search(posted_teams[key]), posted_teams[key]
    assert "\\x0aRemoved (0):" in posted_teams["text"]


# -- the apt hook's syslog lines ----------------------------------------------------------

@pytest.fixture
def syslog_socket() -> Iterator[tuple[Path, socket.socket]]:
    directory = Path(tempfile.mkdtemp(prefix="ih-"))  # sun_path holds 108 bytes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(directory / "log"))
    server.settimeout(5)
    try:
        yield directory / "log", server
    finally:
        server.close()
        shutil.rmtree(directory)


def test_apt_hook_lines_in_syslog_escape_it(tmp_path: Path, tree: Path,
                                            write_policy: Any,
                                            syslog_socket: tuple[Path, socket.socket],
                                            ) -> None:
    """The hook pipes `approve --package-updates` into `logger`, one message per line:
    a name that is left open must arrive as one message, escaped."""
    if shutil.which("logger") is None:
        pytest.skip("util-linux logger is not installed")
    address, server = syslog_socket
    policy = write_policy({"path": str(tree), "check": "static", "severity": "high"})
    db = tmp_path / "state" / "integrity.db"
    assert subprocess.run(python_cli(db, policy, "init"), capture_output=True,
                          timeout=120).returncode == 0
    (Path(os.fsdecode(os.fsencode(tree) + b"/" + EVIL))).write_bytes(b"by hand\n")
    from integrity import apthook

    command = apthook.command_line([sys.executable, "-m", "integrity"], f"sqlite:///{db}",
                                   str(policy))
    # logger itself, told which socket to write to (there is no /dev/log here).
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "logger").write_text(f'#!/bin/sh\nexec {shutil.which("logger")} '
                                 f'--socket {address} "$@"\n')
    (shim / "logger").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    ran = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    messages = []
    server.settimeout(2)
    try:
        while True:
            messages.append(server.recv(65536).decode("utf-8", "replace"))
    except TimeoutError:
        pass
    texts = [m.split("integrity-apt", 1)[1] for m in messages]
    left = [t for t in texts if "left open" in t and "evil" in t]
    assert len(left) == 1, texts
    assert ESCAPED in left[0]
    for text in texts:
        assert_clean(text)
        assert "Removed (0):" not in text.split(":", 1)[-1].strip()[:14]


# -- row 18: bad URLs and closed pipes ------------------------------------------------------

@pytest.mark.parametrize(("url", "words"), [
    ("postgresql://u:SECRET@h:notaport/x", "port is not a number"),
    ("nosuchdb://h/x", "unknown database driver 'nosuchdb'"),
    ("postgresql+nosuch://u:SECRET@h/x", "unknown database driver 'postgresql+nosuch'"),
    ("not a url at all", "not a database URL"),
])
def test_a_bad_database_url_is_one_line_and_exit_2(run: Cli, url: str, words: str,
                                                   tmp_path: Path) -> None:
    for args in (["verify"], ["init"], ["status"], ["db", "upgrade"]):
        result = run("--db", url, *args)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip()
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert words in line and "internal error" not in line, line
        assert "SECRET" not in result.output


def test_a_database_url_never_shows_its_password(run: Cli, tmp_path: Path) -> None:
    """Not in the authority, not in the query (libpq reads ?password= as well)."""
    result = run("--db", "postgresql+nosuch://u@h/x?password=SECRET&sslmode=require",
                 "status")
    assert result.exit_code == 2 and "SECRET" not in result.output
    assert "password=***" in result.stderr


def _read_one_line_then_close(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run argv, read its first line, close the pipe as `head -1` does, and return
    (status, first line, everything on stderr)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=cwd)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        code = proc.wait(timeout=120)
        err.seek(0)
        return code, first, err.read()


@pytest.fixture(scope="module")
def many_events(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A baseline, then 1,500 files added and recorded: output far beyond what a pipe
    buffers (64 KiB). Returns (directory, database, policy)."""
    base = tmp_path_factory.mktemp("pipe")
    root = base / "many"
    root.mkdir()
    policy = base / "policy.toml"
    policy.write_text(f'[[rule]]\npath = "{root}"\ncheck = "static"\n')
    db = base / "state" / "integrity.db"
    assert subprocess.run(python_cli(db, policy, "init"), timeout=120).returncode == 0
    for index in range(1500):
        (root / f"added-{index:05d}-{'x' * 60}").write_bytes(b"")
    assert subprocess.run(python_cli(db, policy, "verify"), stdout=subprocess.DEVNULL,
                          timeout=300).returncode == 1
    return base, db, policy


@pytest.mark.parametrize("command", [["events"], ["verify", "--fast"], ["events", "--json"],
                                     ["status"]])
def test_a_closed_pipe_ends_quietly(many_events: tuple[Path, Path, Path],
                                    command: list[str]) -> None:
    """`integrity events | head -1`: no "Broken pipe" line, no traceback, and no
    status that means something else (2 "could not run", 0 "no changes" for verify):
    SIGPIPE, as cat and grep end. (`status` prints little: it may finish first.)"""
    base, db, policy = many_events
    code, first, err = _read_one_line_then_close(python_cli(db, policy, *command), base)
    assert first, "nothing was printed"
    assert err == b"", err.decode(errors="replace")
    assert code in ((0, 1, -signal.SIGPIPE) if command == ["status"] else
                    (-signal.SIGPIPE,)), code


# -- row 19: syslog messages within 8 KiB, structured data intact ----------------------------

#: RFC 5424 SD-ELEMENT: SD-ID, then PARAM-NAME="PARAM-VALUE" with '"', '\' and ']'
#: escaped by a backslash (any other backslash stands for itself).
SD_ELEMENT = re.compile(r'\[([^ =\]"]+)((?: [^ =\]"]{1,32}="(?:[^"\\\]]|\\.)*")*)\]')
PARAM = re.compile(r' ([^ =\]"]{1,32})="((?:[^"\\\]]|\\.)*)"')


def _unescape_sd(value: str) -> str:
    return re.sub(r'\\(["\\\]])', r"\1", value)


def test_syslog_message_of_a_deep_hostile_path_stays_within_8_kib(
        tmp_path: Path, syslog_socket: tuple[Path, socket.socket]) -> None:
    address, server = syslog_socket
    [sink] = _sinks(tmp_path, f'[[alert]]\ntype = "syslog"\nsocket = "{address}"\n')
    deep = "/srv/" + "/".join([f"d{i:03d}\x1b\n\"]\\" + "\x01" * 30 for i in range(120)])
    shown = "/srv/" + "/".join([f"d{i:03d}\\x1b\\x0a\"]\\" + "\\x01" * 30
                                for i in range(120)])
    event = _event(deep, kind="modified", changed=["content"],
                   actor={"pid": 9, "exe": "/usr/bin/" + "\x1b" * 2000, "user": "root"})
    sink.deliver([event])
    message = server.recv(65536)
    assert len(message) <= 8192, len(message)
    text = message.decode("utf-8")
    header = re.match(r"<\d+>1 \S+ \S+ \S+ \d+ \S+ ", text)
    assert header, text[:200]
    element = SD_ELEMENT.match(text, header.end())
    assert element and element.group(1) == "integrity@32473", text[header.end():][:300]
    params = dict(PARAM.findall(element.group(2)))
    assert params["truncated"] == "path,exe,msg"
    assert params["kind"] == "modified" and params["severity"] == "high"
    # The kept part of the path is the start of the escaped path, marked as cut.
    path = _unescape_sd(params["path"])
    assert path.endswith("...") and len(path) > 1000
    assert shown.startswith(path[:-3])
    assert not RAW.search(text), "a control character reached syslog"
    rest = text[element.end():]
    assert rest.startswith(" high: modified /srv/d000\\x1b\\x0a") and rest.endswith("...")


def test_syslog_leaves_a_message_that_fits_as_it_is(
        tmp_path: Path, syslog_socket: tuple[Path, socket.socket]) -> None:
    address, server = syslog_socket
    [sink] = _sinks(tmp_path, f'[[alert]]\ntype = "syslog"\nsocket = "{address}"\n')
    sink.deliver([_event("/etc/ok\x1b")])
    text = server.recv(65536).decode()
    assert "truncated=" not in text and 'path="/etc/ok\\\\x1b"' in text
    assert text.endswith("high: added /etc/ok\\x1b by /tmp/\\x1b]0;x\\x07 (pid 9, user root)")
    assert stat.S_ISSOCK(os.stat(address).st_mode)


def test_a_name_cannot_split_or_forge_a_json_line(run: Cli, tree: Path, tmp_path: Path,
                                                  write_policy: Any) -> None:
    """JSON allows U+2028, U+2029 and U+0085 raw inside a string, and str.splitlines()
    (and readers built on it) end a line at each: a file name holding one broke its
    alert into two lines that are not JSON, and could carry a forged event line. In
    the jsonl file and an exec command's stdin each line must be one whole event."""
    forged = '{"path":"nothing","kind":"modified","severity":"low"}'
    name = f"shell\u2028{forged}\u2029x\u0085y.php"
    stdin_copy = tmp_path / "stdin.jsonl"
    policy = write_policy({"path": str(tree), "check": "static"}, extra=f"""
        [[alert]]
        type = "jsonl"
        path = "{tmp_path}/alerts.jsonl"

        [[alert]]
        type = "exec"
        command = ["/bin/sh", "-c", "cat >> {stdin_copy}"]
        """)
    cli = Cli(tmp_path / "j.db", policy)
    assert cli("init").exit_code == 0
    (tree / name).write_text("<?php\n")
    assert cli("verify").exit_code == 1
    for text in ((tmp_path / "alerts.jsonl").read_text(), stdin_copy.read_text()):
        events = [json.loads(line) for line in text.splitlines()]  # each one whole
        assert str(tree / name) in {e["path"] for e in events}  # exact, as JSON is
        assert all(e["path"].startswith(str(tree)) for e in events), events  # no forgery
