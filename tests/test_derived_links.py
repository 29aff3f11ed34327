"""Links maintainer scripts make, for real: packages built with dpkg-deb whose scripts
call update-alternatives, deb-systemd-helper and update-rc.d as Debian's do, installed,
upgraded, removed and purged with dpkg, each step approved with
`approve --package-updates`. Nothing a package run made may stay open; a link changed
or removed by hand must.

dpkg logs to /var/log/dpkg.log here: the removal of a package's own files is explained
by that log. The tests take tests/test_packages.py's lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import rows
from debs import build_deb, dpkg_cmd
from test_derived import approve, changes_of, exclusive, needs_root, policy, \
    quiet_dpkg_log

ALT = "integrity-test-alt"
ALT_DIR = f"/usr/lib/{ALT}"
ALT_LINK = f"/usr/bin/{ALT}"
ALT_MAN = f"/usr/share/man/man1/{ALT}.1.gz"
ALT_SEL = f"/etc/alternatives/{ALT}"
ALT_SEL_MAN = f"/etc/alternatives/{ALT}.1.gz"
PLANTED_LINK = f"/usr/bin/{ALT}-planted"
ALT_RULES = [ALT_LINK, ALT_MAN, ALT_SEL, ALT_SEL_MAN, ALT_DIR, PLANTED_LINK]


def _alt_package(work: Path, which: str, priority: int, slave: bool) -> Path:
    """integrity-test-alt-WHICH: one choice of the group, with or without a man page
    slave, registered and unregistered as packages do it."""
    tool, man = f"{ALT_DIR}/{which}", f"{ALT_DIR}/{which}.1.gz"
    files: dict[str, bytes | tuple[bytes, int]] = {
        tool: (f"#!/bin/sh\necho {which}\n".encode(), 0o755)}
    install = f"update-alternatives --install {ALT_LINK} {ALT} {tool} {priority}"
    if slave:
        files[man] = f"man page {which}\n".encode()
        install += f" --slave {ALT_MAN} {ALT}.1.gz {man}"
    return build_deb(work, f"{ALT}-{which}", "1.0", files, scripts={
        "postinst": f"#!/bin/sh\nset -e\n{install}\n",
        "prerm": "#!/bin/sh\nset -e\n"
                 'if [ "$1" = remove ] || [ "$1" = deconfigure ]; then\n'
                 f"    update-alternatives --remove {ALT} {tool}\nfi\n"})


@pytest.fixture
def alt_debs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    debs = {"a": _alt_package(tmp_path, "a", 50, True),
            "b": _alt_package(tmp_path, "b", 70, False)}

    def clean() -> None:
        for which in ("b", "a"):
            dpkg_cmd("--purge", f"{ALT}-{which}", check=False)
        subprocess.run(["update-alternatives", "--remove-all", ALT], capture_output=True)
        for path in (PLANTED_LINK, ALT_LINK, ALT_SEL, ALT_MAN, ALT_SEL_MAN):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(ALT_DIR, ignore_errors=True)

    with exclusive():
        clean()
        try:
            yield debs
        finally:
            clean()


@needs_root
def test_alternatives_installed_switched_and_removed_leave_nothing_open(
        tmp_path: Path, alt_debs: dict[str, Path]) -> None:
    run = policy(tmp_path, ALT_RULES)
    quiet_dpkg_log()
    assert run("init").exit_code == 0

    dpkg_cmd("-i", str(alt_debs["a"]))
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/a"
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(changes) == set(approved)
    assert {approved[p] for p in (ALT_LINK, ALT_SEL, ALT_MAN, ALT_SEL_MAN)} == \
        {"derived:alternatives"}

    # A choice of higher priority without the slave: the slave links go away.
    dpkg_cmd("-i", str(alt_debs["b"]))
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/b" and not os.path.lexists(ALT_MAN)
    changes = changes_of(run)
    assert {changes[p]["kind"] for p in (ALT_MAN, ALT_SEL_MAN)} == {"removed"}
    approved, left = approve(run)
    assert left == {}
    assert approved[ALT_SEL] == approved[ALT_MAN] == "derived:alternatives"

    dpkg_cmd("-r", f"{ALT}-b")
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/a"
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(changes) == set(approved)

    dpkg_cmd("--purge", f"{ALT}-a")
    assert not os.path.lexists(ALT_LINK)
    changes = changes_of(run)
    assert {c["kind"] for c in changes.values()} == {"removed"}
    approved, left = approve(run)
    assert left == {}
    assert {approved[p] for p in (ALT_LINK, ALT_SEL, ALT_MAN, ALT_SEL_MAN)} == \
        {"derived:alternatives"}


@needs_root
def test_alternatives_links_pointing_elsewhere_stay_open(
        tmp_path: Path, alt_debs: dict[str, Path]) -> None:
    dpkg_cmd("-i", str(alt_debs["a"]))
    run = policy(tmp_path, ALT_RULES)
    assert run("init").exit_code == 0

    # The selection pointed at another file (a package's own, even).
    os.unlink(ALT_SEL)
    os.symlink(f"{ALT_DIR}/a.1.gz", ALT_SEL)
    # A generic link nobody registered, dressed like one.
    os.symlink(ALT_SEL, PLANTED_LINK)
    changes_of(run)
    _, left = approve(run)
    assert left == {
        ALT_SEL: f"points to {ALT_DIR}/a.1.gz; update-alternatives points it to "
                 f"{ALT_DIR}/a ({ALT} (auto) selects {ALT_DIR}/a, priority 50)",
        PLANTED_LINK: "update-alternatives makes no such link (no alternatives group "
                      "names this link)"}

    # Registered by hand for a file no package ships: the links agree with dpkg's
    # database, and still do not pass.
    os.unlink(PLANTED_LINK)
    os.unlink(ALT_SEL)
    os.symlink(f"{ALT_DIR}/a", ALT_SEL)
    evil = tmp_path / "evil"
    evil.write_text("#!/bin/sh\n")
    evil.chmod(0o755)
    subprocess.run(["update-alternatives", "--install", ALT_LINK, ALT, str(evil), "100"],
                   check=True, capture_output=True)
    assert os.readlink(ALT_SEL) == str(evil)
    changes_of(run)
    _, left = approve(run)
    assert left[ALT_SEL] == (f"{evil} is not installed by any package ({ALT} (auto) "
                             f"selects {evil}, priority 100)")


SVC = "integrity-test-svc"
UNIT = f"{SVC}.service"
UNIT_FILE = f"/usr/lib/systemd/system/{UNIT}"
WANTS = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"
ALIAS = f"/etc/systemd/system/{SVC}-alias.service"
MASK = f"/etc/systemd/system/{UNIT}"
SCRIPT = f"/etc/init.d/{SVC}"
RC = [f"/etc/rc{level}.d/{letter}01{SVC}" for level in "0123456S" for letter in "SK"]

_UNIT_TEXT = (f"[Unit]\nDescription=integrity test service\n\n[Service]\n"
              f"ExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n"
              f"Alias={SVC}-alias.service\n")
_SCRIPT_TEXT = (f"#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          {SVC}\n"
                "# Required-Start:    $remote_fs\n# Required-Stop:     $remote_fs\n"
                "# Default-Start:     2 3 4 5\n# Default-Stop:      0 1 6\n"
                "# Short-Description: integrity test service\n### END INIT INFO\n"
                "exit 0\n")
# What dh_installsystemd and dh_installinit write (without starting anything).
_CONFIGURE = ('if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || '
              '[ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then\n')
_POSTINST = ("#!/bin/sh\nset -e\n" + _CONFIGURE +
             f"  deb-systemd-helper unmask '{UNIT}' >/dev/null || true\n"
             f"  if deb-systemd-helper --quiet was-enabled '{UNIT}'; then\n"
             f"    deb-systemd-helper enable '{UNIT}' >/dev/null || true\n"
             f"  else\n    deb-systemd-helper update-state '{UNIT}' >/dev/null || true\n"
             f"  fi\nfi\n" + _CONFIGURE +
             f'  if [ -x "{SCRIPT}" ]; then update-rc.d {SVC} defaults >/dev/null; fi\nfi\n')
_POSTRM = ("#!/bin/sh\nset -e\n"
           f'if [ "$1" = "purge" ] ; then update-rc.d {SVC} remove >/dev/null; fi\n'
           f'if [ "$1" = "remove" ]; then\n'
           f"  deb-systemd-helper mask '{UNIT}' >/dev/null || true\nfi\n"
           f'if [ "$1" = "purge" ]; then\n'
           f"  deb-systemd-helper purge '{UNIT}' >/dev/null || true\n"
           f"  deb-systemd-helper unmask '{UNIT}' >/dev/null || true\nfi\n")


@pytest.fixture
def svc_deb(tmp_path: Path) -> Iterator[Path]:
    deb = build_deb(tmp_path, SVC, "1.0",
                    {f"/lib/systemd/system/{UNIT}": _UNIT_TEXT.encode(),
                     SCRIPT: (_SCRIPT_TEXT.encode(), 0o755)},
                    conffiles=[SCRIPT], scripts={"postinst": _POSTINST, "postrm": _POSTRM})
    with exclusive():
        dpkg_cmd("--purge", SVC, check=False)
        try:
            yield deb
        finally:
            dpkg_cmd("--purge", SVC, check=False)
            for path in (WANTS, ALIAS, MASK, *RC):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


@needs_root
@pytest.mark.skipif(shutil.which("deb-systemd-helper") is None
                    or shutil.which("update-rc.d") is None,
                    reason="needs init-system-helpers")
def test_service_links_from_install_to_purge(tmp_path: Path, svc_deb: Path) -> None:
    run = policy(tmp_path, [WANTS, ALIAS, MASK, SCRIPT, UNIT_FILE, *RC])
    quiet_dpkg_log()
    assert run("init").exit_code == 0

    dpkg_cmd("-i", str(svc_deb))
    links = [p for p in (WANTS, ALIAS, *RC) if os.path.lexists(p)]
    assert WANTS in links and ALIAS in links and f"/etc/rc2.d/S01{SVC}" in links
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(approved) == set(changes) >= set(links)
    assert approved[WANTS] == approved[ALIAS] == "derived:deb-systemd-helper"
    assert {approved[p] for p in links if p.startswith("/etc/rc")} == \
        {"derived:update-rc.d"}

    # Disabled by hand (what `systemctl disable` and a deleted rc link do): the helpers'
    # state still enables the service, so the removals are a person's, not a package's.
    target = os.readlink(WANTS)
    os.unlink(WANTS)
    os.unlink(f"/etc/rc2.d/S01{SVC}")
    changes_of(run)
    _, left = approve(run)
    assert left == {
        WANTS: f"removed, but deb-systemd-helper still links it to {target} "
               f"([Install] of /lib/systemd/system/{UNIT} (matches {SVC} 1.0 (dpkg "
               "md5sums)))",
        f"/etc/rc2.d/S01{SVC}": f"removed, but update-rc.d still links it to "
                                f"../init.d/{SVC} (Default-Start '2 3 4 5', Default-Stop "
                                f"'0 1 6' of {SCRIPT})"}
    os.symlink(target, WANTS)
    os.symlink(f"../init.d/{SVC}", f"/etc/rc2.d/S01{SVC}")
    changes_of(run)
    approved, left = approve(run)
    assert left == {} and set(approved) == {WANTS, f"/etc/rc2.d/S01{SVC}"}

    dpkg_cmd("-r", SVC)  # the unit is masked while the package is removed but not purged
    assert os.readlink(MASK) == "/dev/null"
    changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert approved[MASK] == "derived:deb-systemd-helper"

    dpkg_cmd("--purge", SVC)
    assert not any(os.path.lexists(p) for p in (WANTS, ALIAS, MASK, *RC))
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(approved) == set(changes) >= {WANTS, ALIAS, MASK, f"/etc/rc2.d/S01{SVC}"}


# -- links a person made, dressed as a package run's ------------------------------------

@needs_root
@pytest.mark.skipif(shutil.which("deb-systemd-helper") is None,
                    reason="needs init-system-helpers")
def test_a_service_enabled_by_hand_after_a_disable_before_the_baseline_stays_open(
        tmp_path: Path, svc_deb: Path) -> None:
    """The admin disabled a packaged service before the baseline (the links are gone,
    deb-systemd-helper's record and markers stay); re-enabling it by hand is no package
    run's, even after the package was upgraded (its postinst then leaves it disabled)."""
    run = policy(tmp_path, [WANTS, ALIAS, MASK, UNIT_FILE])
    dpkg_cmd("-i", str(svc_deb))
    target = os.readlink(WANTS)
    os.unlink(WANTS)  # systemctl disable
    os.unlink(ALIAS)
    quiet_dpkg_log()
    assert run("init").exit_code == 0

    os.symlink(target, WANTS)  # systemctl enable, by hand
    os.symlink(target, ALIAS)
    assert set(changes_of(run)) == {WANTS, ALIAS}
    approved, left = approve(run)
    assert approved == {}
    assert left[WANTS] == (f"{UNIT} was enabled, but {SVC} was not installed or upgraded "
                           "since the baseline: no package run made this link (a person's "
                           "systemctl enable)")
    assert set(left) == {WANTS, ALIAS}

    # The package upgraded since: its postinst sees the unit disabled and keeps it so.
    # A scan then sees the links absent, as recorded: the upgrade before it made none
    # of what is linked after it.
    os.unlink(WANTS)
    os.unlink(ALIAS)
    dpkg_cmd("-i", str(svc_deb))
    assert not os.path.lexists(WANTS) and not os.path.lexists(ALIAS)
    quiet_dpkg_log()  # the log counts seconds: the scan starts in a later one
    changes_of(run)
    seen = last_scan_start(tmp_path)
    _, left = approve(run)
    assert left == {}
    os.symlink(target, WANTS)
    os.symlink(target, ALIAS)
    changes_of(run)
    approved, left = approve(run)
    assert approved == {}
    assert left[WANTS] == (f"{UNIT} was enabled, but {SVC} was not installed or upgraded "
                           f"since its last sighting as recorded ({seen}): no package run "
                           "made this link (a person's systemctl enable)")

    # Upgraded after that sighting, and the links made by hand before any scan: the
    # marker, older than the sighting, tells the person's link from the package's.
    os.unlink(WANTS)
    os.unlink(ALIAS)
    changes_of(run)
    seen = last_scan_start(tmp_path)
    dpkg_cmd("-i", str(svc_deb))
    assert not os.path.lexists(WANTS) and not os.path.lexists(ALIAS)
    os.symlink(target, WANTS)
    os.symlink(target, ALIAS)
    changes_of(run)
    approved, left = approve(run)
    assert approved == {UNIT_FILE: "package-db"}  # the upgrade's own
    marker = f"/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/{UNIT}"
    assert left[WANTS] == (f"deb-systemd-helper's enabled marker {marker} predates its "
                           f"last sighting as recorded ({seen}), which did not have this "
                           "link: a person disabled the unit, and deb-systemd-helper never "
                           "enables it again, so re-adding the link is a person's "
                           "systemctl enable")
    assert set(left) == {WANTS, ALIAS}


def last_scan_start(tmp_path: Path) -> str:
    """When the last verify of policy(tmp_path)'s database started, as reasons say it."""
    (started,), = rows(tmp_path / "state" / "integrity.db",
                       "SELECT started FROM run ORDER BY id DESC LIMIT 1")
    return dt.datetime.fromisoformat(started).strftime("%Y-%m-%dT%H:%M:%SZ")


MASKED_DIR = "/var/lib/systemd/deb-systemd-helper-masked"


@needs_root
def test_a_mask_made_by_hand_with_a_planted_masked_marker_stays_open(
        tmp_path: Path, svc_deb: Path) -> None:
    """systemctl mask by hand (a link to /dev/null) plus an empty marker planted in
    deb-systemd-helper's masked state: no package was removed, so it stays open, for
    an installed unit (think auditd), for a unit nothing ships, and for a unit whose
    file was deleted by hand."""
    other = "integrity-test-nothing-ships.service"
    other_link = f"/etc/systemd/system/{other}"
    run = policy(tmp_path, [WANTS, ALIAS, MASK, UNIT_FILE, other_link])
    dpkg_cmd("-i", str(svc_deb))
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    made_dir = not os.path.isdir(MASKED_DIR)
    planted = [Path(MASKED_DIR, UNIT), Path(MASKED_DIR, other)]
    try:
        os.makedirs(MASKED_DIR, exist_ok=True)
        for marker in planted:
            marker.touch()
        os.symlink("/dev/null", MASK)
        os.symlink("/dev/null", other_link)
        assert set(changes_of(run)) == {MASK, other_link}
        approved, left = approve(run)
        assert approved == {}
        assert left == {
            MASK: f"{UNIT} is masked, but its unit file /lib/systemd/system/{UNIT} is "
                  "still installed: deb-systemd-helper masks a unit only when its package "
                  "is removed (a person's systemctl mask)",
            other_link: f"{other} is masked, but no removal of its unit file by its "
                        "package is in this approval: nothing shows that the package "
                        "shipping it was removed"}

        # The unit file deleted by hand as well: its package was not removed.
        os.unlink(f"/lib/systemd/system/{UNIT}")
        changes_of(run)
        approved, left = approve(run)
        assert approved == {}
        assert left[MASK] == (f"{UNIT} is masked, but {SVC}, which shipped it, was not "
                              "removed since the baseline (dpkg's log)")
    finally:
        for path in (MASK, other_link):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for marker in planted:
            marker.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(MASKED_DIR)


@needs_root
def test_an_admins_mask_removed_by_hand_stays_open(tmp_path: Path, svc_deb: Path) -> None:
    """The admin masked a unit (systemctl mask: a link to /dev/null, no marker of
    deb-systemd-helper's) before the baseline; an attacker unmasks it. No package was
    installed again or purged, so no postinst or postrm unmasked it: it stays open."""
    run = policy(tmp_path, [WANTS, ALIAS, MASK, UNIT_FILE])
    dpkg_cmd("-i", str(svc_deb))
    os.symlink("/dev/null", MASK)
    try:
        quiet_dpkg_log()
        assert run("init").exit_code == 0
        os.unlink(MASK)
        assert set(changes_of(run)) == {MASK}
        approved, left = approve(run)
        assert approved == {}
        assert left == {MASK: f"the mask of {UNIT} was removed, but dpkg logged no "
                              "install, upgrade or purge of a package shipping it since "
                              "the baseline (a person's systemctl unmask)"}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(MASK)


@needs_root
def test_alternatives_registered_by_hand_for_a_packaged_file_stay_open(
        tmp_path: Path, alt_debs: dict[str, Path]) -> None:
    """update-alternatives run by hand writes the very database the links are judged
    by: a group registered for any protected path with a packaged choice (dash), or a
    packaged choice added by hand to a package's group, is no package run's."""
    run = policy(tmp_path, ALT_RULES)
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    subprocess.run(["update-alternatives", "--install", PLANTED_LINK, ALT, "/usr/bin/dash",
                    "50"], check=True, capture_output=True)
    assert os.readlink(PLANTED_LINK) == ALT_SEL and os.readlink(ALT_SEL) == "/usr/bin/dash"
    assert set(changes_of(run)) == {PLANTED_LINK, ALT_SEL}
    approved, left = approve(run)
    assert approved == {}
    why = (f"{ALT} agrees with dpkg's alternatives database, but dash, which ships the "
           "choice /usr/bin/dash, was not installed or upgraded since the baseline: the "
           "group was registered or changed by hand (update-alternatives), not by a "
           "package run")
    assert left == {PLANTED_LINK: why, ALT_SEL: why}
    subprocess.run(["update-alternatives", "--remove-all", ALT], check=True,
                   capture_output=True)

    # A package's group, then a choice of higher priority added to it by hand.
    dpkg_cmd("-i", str(alt_debs["a"]))
    changes_of(run)
    approved, left = approve(run)
    assert left == {} and approved[ALT_SEL] == "derived:alternatives"
    (tmp_path / "again").mkdir()
    run = policy(tmp_path / "again", ALT_RULES)
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    subprocess.run(["update-alternatives", "--install", ALT_LINK, ALT, "/usr/bin/dash",
                    "100"], check=True, capture_output=True)
    assert os.readlink(ALT_SEL) == "/usr/bin/dash"
    changes_of(run)
    _, left = approve(run)
    assert left[ALT_SEL] == why


@needs_root
def test_a_package_run_before_a_path_was_last_seen_as_recorded_explains_nothing_there(
        tmp_path: Path, alt_debs: dict[str, Path]) -> None:
    """A package run vouches only for what it can have made: once a scan has seen a
    path as recorded after the run, a change made there later is someone else's, however
    much later than the baseline the run was. Both choices' packages are installed and
    approved, a scan sees the group as recorded, then a person raises the other choice's
    priority by hand (update-alternatives --install, which leaves the group in automatic
    mode): the installs explain nothing of it."""
    run = policy(tmp_path, ALT_RULES)
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    dpkg_cmd("-i", str(alt_debs["a"]))
    dpkg_cmd("-i", str(alt_debs["b"]))
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/b"
    changes_of(run)
    approved, left = approve(run)
    assert left == {} and approved[ALT_SEL] == "derived:alternatives"
    quiet_dpkg_log()  # the scan below starts in a later second than the installs
    assert changes_of(run) == {}
    seen = last_scan_start(tmp_path)

    subprocess.run(["update-alternatives", "--install", ALT_LINK, ALT, f"{ALT_DIR}/a",
                    "100", "--slave", ALT_MAN, f"{ALT}.1.gz", f"{ALT_DIR}/a.1.gz"],
                   check=True, capture_output=True)
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/a"
    assert set(changes_of(run)) == {ALT_SEL, ALT_MAN, ALT_SEL_MAN}
    approved, left = approve(run)
    assert approved == {}
    assert left[ALT_SEL] == (
        f"{ALT} agrees with dpkg's alternatives database, but {ALT}-a, which ships the "
        f"choice {ALT_DIR}/a, was not installed or upgraded since its last sighting as "
        f"recorded ({seen}): the group was registered or changed by hand "
        "(update-alternatives), not by a package run")
    assert set(left) == {ALT_SEL, ALT_MAN, ALT_SEL_MAN}


@needs_root
def test_alternatives_fall_back_when_the_selected_package_is_removed(
        tmp_path: Path, alt_debs: dict[str, Path]) -> None:
    """Both choices installed before the baseline; removing the selected one's package
    moves the selection (and the slave links) back to the other, whose package did not
    run: the fallback passes because the choice it had is gone with its package."""
    dpkg_cmd("-i", str(alt_debs["a"]))
    dpkg_cmd("-i", str(alt_debs["b"]))
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/b" and not os.path.lexists(ALT_MAN)
    run = policy(tmp_path, ALT_RULES)
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    dpkg_cmd("-r", f"{ALT}-b")
    assert os.readlink(ALT_SEL) == f"{ALT_DIR}/a" and os.path.lexists(ALT_MAN)
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(approved) == set(changes) >= {ALT_SEL, ALT_MAN, ALT_SEL_MAN}
    assert {approved[p] for p in (ALT_SEL, ALT_MAN, ALT_SEL_MAN)} == \
        {"derived:alternatives"}


@needs_root
@pytest.mark.skipif(shutil.which("deb-systemd-helper") is None,
                    reason="needs init-system-helpers")
def test_a_service_of_a_package_removed_since_the_baseline_is_masked(
        tmp_path: Path, svc_deb: Path) -> None:
    """Installed before the baseline, removed after: deb-systemd-helper's mask passes."""
    run = policy(tmp_path, [WANTS, ALIAS, MASK, UNIT_FILE])
    dpkg_cmd("-i", str(svc_deb))
    quiet_dpkg_log()
    assert run("init").exit_code == 0
    dpkg_cmd("-r", SVC)
    assert os.readlink(MASK) == "/dev/null"
    changes = changes_of(run)
    approved, left = approve(run)
    assert left == {}
    assert set(approved) == set(changes) == {MASK, UNIT_FILE}
    assert approved[MASK] == "derived:deb-systemd-helper"
