"""The shipped systemd units: systemd-analyze accepts them, and they say what we mean.

PID 1 is not systemd on the machines we test on, so the units cannot be started;
`systemd-analyze verify` loads them as the manager would and reports unknown keys,
unparsable values and missing executables. It exits 0 on most of those (it logs
"..., ignoring." and carries on), so a unit passes only with no output about it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO

UNIT_DIR = REPO / "systemd"
UNITS = ("integrity.service", "integrity-verify.service", "integrity-verify.timer",
         "integrity-fleet-monitor.service")
SHIPPED_EXEC = "/usr/local/bin/integrity"

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file ([section] headers and comments dropped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def unit(name: str) -> dict[str, list[str]]:
    return settings((UNIT_DIR / name).read_text())


def installed_copy(tmp_path: Path, broken: str = "",
                   breakage: Callable[[str], str] | None = None) -> Path:
    """The units in a temporary directory, ExecStart pointing at the real executable.

    verify insists that ExecStart's binary exists; the shipped path
    (/usr/local/bin/integrity) does not on a development machine.
    """
    executable = shutil.which("integrity")
    if executable is None:
        pytest.skip("the integrity console script is not installed")
    directory = tmp_path / "units"
    directory.mkdir()
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        text = text.replace(SHIPPED_EXEC, executable)
        if name == broken and breakage is not None:
            text = breakage(text)
        (directory / name).write_text(text)
    return directory


def analyze(directory: Path, name: str) -> list[str]:
    """Problems systemd-analyze verify reports about one unit (empty when clean)."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(directory / name)],
        capture_output=True, text=True, timeout=60, cwd=directory)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if name in line or str(directory) in line]
    if result.returncode != 0 and not ours:
        ours = lines or [f"systemd-analyze verify exited {result.returncode}"]
    return ours


@pytest.mark.parametrize("name", UNITS)
def test_units_verify_cleanly(tmp_path: Path, name: str) -> None:
    assert analyze(installed_copy(tmp_path), name) == []


@pytest.mark.parametrize("name, breakage, expected", [
    ("integrity.service", lambda t: t.replace("Type=notify", "Type=notfy"), "notfy"),
    ("integrity.service", lambda t: t.replace("[Service]", "[Service]\nWatchdogSecs=60"),
     "WatchdogSecs"),
    ("integrity.service", lambda t: re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/integrity",
                                           t), "/nonexistent/integrity"),
    ("integrity-verify.service", lambda t: t.replace("SuccessExitStatus=1",
                                                     "SuccessExitStatus=one"), "one"),
    ("integrity-verify.timer", lambda t: t.replace("03:00:00", "25:99:00"), "25:99"),
])
def test_a_broken_unit_is_caught(tmp_path: Path, name: str,
                                 breakage: Callable[[str], str], expected: str) -> None:
    """The check above would pass anything if verify's warnings were not read."""
    directory = installed_copy(tmp_path, name, breakage)
    problems = analyze(directory, name)
    assert problems, f"systemd-analyze accepted a broken {name}"
    assert any(expected in line for line in problems), problems


def test_watcher_unit_settings() -> None:
    service = unit("integrity.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{SHIPPED_EXEC} watch"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["always"]
    assert service["WatchdogSec"] == ["60"]
    assert service["KillSignal"] == ["SIGTERM"]
    # Nothing may hide a tree the policy protects.
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["read-only"]
    assert "ProtectKernelModules" not in service  # it hides /usr/lib/modules
    assert not {"InaccessiblePaths", "TemporaryFileSystem", "PrivateDevices"} & set(service)
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert {"CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_SYS_ADMIN"} <= caps
    assert "CAP_DAC_OVERRIDE" not in caps and "CAP_SYS_MODULE" not in caps
    assert service["WantedBy"] == ["multi-user.target"]


def test_verify_unit_is_a_full_verify() -> None:
    service = unit("integrity-verify.service")
    assert service["Type"] == ["oneshot"]
    (command,) = service["ExecStart"]
    assert command.split() == [SHIPPED_EXEC, "-q", "verify"]  # never --fast: mtime lies
    assert service["SuccessExitStatus"] == ["1"]
    # Reads the same extended attributes as a root `init`, or trusted.* would differ.
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"][0].split()


def test_timer() -> None:
    timer = unit("integrity-verify.timer")
    assert timer["OnCalendar"] == ["*-*-* 03:00:00"]
    assert timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] == ["15min"]
    assert timer["WantedBy"] == ["timers.target"]
    # It triggers the service of the same name, which must ship alongside.
    assert "Unit" not in timer and (UNIT_DIR / "integrity-verify.service").exists()


def test_fleet_monitor_unit_settings() -> None:
    service = unit("integrity-fleet-monitor.service")
    assert service["Type"] == ["notify"]
    (command,) = service["ExecStart"]
    assert command.split()[1:] == ["--policy", "/etc/integrity/monitor.toml", "fleet",
                                   "monitor"]
    assert service["Restart"] == ["always"]
    assert service["DynamicUser"] == ["yes"] and service["CapabilityBoundingSet"] == [""]
    # The database password is a credential, never in the unit or the environment.
    assert service["LoadCredential"] == ["pgpass:/etc/integrity/monitor.pgpass"]
    assert service["Environment"].count("PGPASSFILE=%d/pgpass") == 1
    assert not any("PGPASSWORD" in value for value in service["Environment"])
    urls = [v for v in service["Environment"] if v.startswith("INTEGRITY_FLEET_URL=")]
    assert len(urls) == 1 and re.match(r"INTEGRITY_FLEET_URL=postgresql://[^:/@]+@", urls[0])


def test_verify_unit_pushes_a_fleet_host_whatever_verify_found() -> None:
    service = unit("integrity-verify.service")
    assert service["ExecStopPost"] == [f"-{SHIPPED_EXEC} -q fleet push --if-configured"]


@pytest.mark.parametrize("name", ["integrity.service", "integrity-verify.service",
                                  "integrity-fleet-monitor.service"])
def test_hardening_does_not_regress(tmp_path: Path, name: str) -> None:
    """systemd's own exposure score (0 best, 10 worst); 4.7 and 4.4 when written."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(installed_copy(tmp_path) / name)],
        capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {result.stderr}")
    assert float(match.group(1)) <= 5.0
