"""What dpkg (and rpm) vouch for, checked against real packages installed for real.

The tests install `integrity-test-pkg` with dpkg into the live system (that is what
the feature is about: dpkg's real database and the real files) and always purge it
again. dpkg's log goes to a temporary file so the removal tests see exactly the
actions they made; apt's archive cache, lists and configuration are temporary
directories (tests/aptrepo.py: a repository signed with a real gpg key), so the
"signed-archive" tests decide exactly which .deb is listed, and the attacks edit real
lists, InRelease files and keyrings.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integrity.packages import PackageManagers
from aptrepo import PREFIX, SUITE, URI, AptRepo, Pinned, SigningKey, rfc1123, tool_files
from debs import (build_deb, build_rpm, dpkg, dpkg_tool, exclusive, owned, packages_stanza,
                  sha256)

PKG = "integrity-test-pkg"
SHARE = "/usr/share/integrity-test"
DATA = f"{SHARE}/data.txt"          # changes in 1.1
NOTES = f"{SHARE}/notes.txt"        # the same in both versions
DROPPED = f"{SHARE}/dropped.txt"    # only in 1.0
TOOL = "/usr/lib/integrity-test/tool"
CONF = "/etc/integrity-test.conf"
LINK = "/usr/lib/integrity-test/current"   # a symlink to the tool

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None
    or shutil.which("gpg") is None or not os.access("/usr/bin/gpgv", os.X_OK),
    reason="installs real packages and signs apt lists: needs root, dpkg, gpg and gpgv")
#: What --require-signed adds to the reason of a change only dpkg's database vouches for.
NEED_SIGNED = ("and --require-signed asks for the signed archive (keep downloaded .debs: "
               "APT::Keep-Downloaded-Packages)")


def _files(version: str) -> dict[str, bytes | tuple[bytes, int]]:
    files: dict[str, bytes | tuple[bytes, int]] = {
        DATA: f"data of version {version}\n".encode(),
        NOTES: b"notes that no version changes\n",
        TOOL: (f"#!/bin/sh\necho integrity-test {version}\n".encode(), 0o755),
        CONF: f"setting = {version}\n".encode(),
    }
    if version == "1.0":
        files[DROPPED] = b"dropped in 1.1\n"
    return files


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Versions 1.0 (xz, read in-process) and 1.1 (zstd, read through dpkg-deb)."""
    work = tmp_path_factory.mktemp("debs")
    links = {LINK: "tool"}
    return {"1.0": build_deb(work, PKG, "1.0", _files("1.0"), [CONF], compression="xz",
                             links=links),
            "1.1": build_deb(work, PKG, "1.1", _files("1.1"), [CONF], compression="zstd",
                             links=links)}


@pytest.fixture(scope="module")
def archive_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """The archive's signing key (its public half is the keyring the baseline pins)."""
    key = SigningKey.generate(tmp_path_factory.mktemp("archive-key") / "gnupg")
    yield key
    key.stop()


@pytest.fixture(scope="module")
def attacker_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A key of the intruder's own."""
    key = SigningKey.generate(tmp_path_factory.mktemp("attacker-key") / "gnupg",
                              "attacker")
    yield key
    key.stop()


@dataclass
class System:
    """Installs the test package and undoes everything a test did to the system."""

    log: Path
    apt: Path
    repo: AptRepo
    #: The keyrings as the baseline recorded them.
    pinned: Pinned
    stanzas: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def dpkg(self, *args: str) -> None:
        dpkg(self.log, *args)

    def install(self, deb: Path) -> None:
        self.dpkg("-i", str(deb))

    def managers(self, require_signed: bool = False) -> PackageManagers:
        """A fresh instance: it snapshots dpkg's database when first asked."""
        return PackageManagers(apt_archives=str(self.apt), apt_lists=str(self.repo.lists),
                               dpkg_log=str(self.log), rpm=None,
                               apt_etc=str(self.repo.etc), baseline_check=self.pinned.check,
                               require_signed=require_signed)

    def publish(self, deb: Path, version: str, listed_sha: str | None = None,
                compression: str = "", **dates: str) -> None:
        """Put the .deb in the apt cache and name its SHA-256 in the signed apt list
        (its InRelease dated by `dates`, see AptRepo.release)."""
        shutil.copy(deb, self.apt / f"{PKG}_{version}_all.deb")
        self.stanzas.append(packages_stanza(PKG, version, "all", listed_sha or sha256(deb)))
        self.repo.publish("".join(self.stanzas), compression, **dates)


@pytest.fixture
def system(tmp_path: Path, archive_key: SigningKey) -> Iterator[System]:
    (tmp_path / "apt").mkdir()
    repo = AptRepo(tmp_path, archive_key)
    state = System(tmp_path / "dpkg.log", tmp_path / "apt", repo, Pinned(repo.keyring))
    state.log.touch()
    with owned(PKG, state.log, [SHARE]):
        try:
            yield state
        finally:
            for cleanup in reversed(state.cleanups):
                try:
                    cleanup()
                except (OSError, subprocess.SubprocessError, AssertionError):
                    pass


def _write(path: str, content: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content)


def test_upgraded_files_and_conffile_are_vouched_by_dpkg(system: System,
                                                         debs: dict[str, Path]) -> None:
    system.install(debs["1.0"])
    system.install(debs["1.1"])
    managers = system.managers()
    assert managers.available() == ["dpkg"]
    for path in (DATA, TOOL, CONF, SHARE):
        verdict = managers.check_content(path.encode())
        assert verdict.vouched, (path, verdict)
        assert verdict.evidence == "package-db"
        assert verdict.package == PKG
    assert managers.check_content(DATA.encode()).reason == \
        f"matches {PKG} 1.1 (dpkg md5sums)"
    # The conffile was untouched, so dpkg replaced it and recorded 1.1's hash.
    assert managers.check_content(CONF.encode()).reason == f"matches {PKG} 1.1 (conffile hash)"


def test_files_changed_by_hand_are_not_vouched(system: System,
                                               debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    _write(NOTES, b"tampered\n")
    _write(CONF, b"setting = local\n")
    managers = system.managers()
    verdict = managers.check_content(NOTES.encode())
    assert not verdict.vouched
    assert verdict.reason == f"content differs from what dpkg shipped ({PKG} 1.1)"
    assert verdict.package == PKG and verdict.evidence is None
    conf = managers.check_content(CONF.encode())
    assert not conf.vouched
    assert conf.reason == (f"content differs from what dpkg shipped ({PKG} 1.1, conffile "
                           f"changed locally)")
    assert managers.check_content(DATA.encode()).vouched


def test_unowned_file_is_not_vouched(system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    extra = f"{SHARE}/added-by-hand.txt"
    system.cleanups.append(lambda: os.unlink(extra))
    _write(extra, b"nobody ships this\n")
    managers = system.managers()
    for check in (managers.check_content(extra.encode()),
                  managers.check_attributes(extra.encode(), 0o644, 0, 0)):
        assert check == check.__class__(False, "not owned by any package", None, None)


def test_multiarch_same_package_is_named_with_its_arch(system: System,
                                                       tmp_path: Path) -> None:
    """dpkg names such a package's info files name:arch; verdicts carry that name."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True, check=True).stdout.strip()
    name, path = "integrity-test-ma", f"/usr/lib/integrity-test-ma/{arch}.txt"
    deb = build_deb(tmp_path, name, "3", {path: b"per-arch\n"}, arch=arch,
                    control="Multi-Arch: same\n")
    system.cleanups.append(lambda: system.dpkg("--purge", f"{name}:{arch}"))
    system.install(deb)
    assert os.path.exists(f"/var/lib/dpkg/info/{name}:{arch}.list")
    verdict = system.managers().check_content(path.encode())
    assert verdict == verdict.__class__(True, f"matches {name} 3 (dpkg md5sums)",
                                        "package-db", f"{name}:{arch}")


def test_usr_merge_spellings_find_the_same_package() -> None:
    """Packages list /bin/ls; a scan of /usr/bin sees /usr/bin/ls (merged /usr)."""
    if not os.path.islink("/bin"):
        pytest.skip("/bin is not a symlink here: no merged /usr")
    managers = PackageManagers(rpm=None)
    listed = Path("/var/lib/dpkg/info/coreutils.list").read_bytes().split(b"\n")
    assert (b"/bin/ls" in listed) != (b"/usr/bin/ls" in listed)
    assert managers.owners(b"/usr/bin/ls") == managers.owners(b"/bin/ls") == ["coreutils"]


def test_the_owner_map_agrees_with_the_owners_of_each_path() -> None:
    """init records owner_map()'s answer for every entry (read from all of dpkg's
    lists at once): a package that owns the path, as owners() says of each path,
    for every listed path below the roots and nothing outside them. Checked against
    this machine's real package database, held still: the other worker's tests
    install and purge the test packages."""
    with exclusive():
        _owner_map_agrees()


def _owner_map_agrees() -> None:
    managers = PackageManagers(rpm=None)
    roots = [b"/usr/sbin", b"/etc"]
    found = managers.owner_map(roots)
    assert found[b"/etc/dpkg/dpkg.cfg"] == "dpkg"
    # Listed as /sbin/start-stop-daemon (merged /usr): found under its canonical name.
    assert found[managers.canonical(b"/sbin/start-stop-daemon")] == "dpkg"
    assert all(p.startswith((b"/usr/sbin/", b"/etc/")) or p in roots for p in found), \
        sorted(p for p in found if not p.startswith((b"/usr/sbin/", b"/etc/")))[:5]
    for path, package in sorted(found.items()):
        # A directory several packages list (/etc): the same one as approve records.
        assert managers.owners(path)[0] == package, path
    # Every listed path below the roots is there (the lists, read another way).
    listed = set()
    for name in os.listdir("/var/lib/dpkg/info"):
        if name.endswith(".list"):
            for line in Path("/var/lib/dpkg/info", name).read_bytes().split(b"\n"):
                path = managers.canonical(line) if line else b""
                if path.startswith((b"/usr/sbin/", b"/etc/")) or path in roots:
                    listed.add(path)
    assert set(found) == listed


def test_attributes_need_a_package_that_states_them(system: System,
                                                    debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    os.chmod(TOOL, 0o700)
    managers = system.managers()
    for mode in (0o700, 0o755):
        verdict = managers.check_attributes(TOOL.encode(), mode, 0, 0)
        assert not verdict.vouched
        assert verdict.reason.startswith("package does not state file attributes")

    system.publish(debs["1.1"], "1.1")
    managers = system.managers()
    by_hand = managers.check_attributes(TOOL.encode(), 0o700, 0, 0)
    assert not by_hand.vouched
    assert by_hand.reason == (f"mode 0700 (package: 0755) differs from what dpkg shipped "
                              f"({PKG} 1.1, verified .deb)")
    shipped = managers.check_attributes(TOOL.encode(), 0o100755, 0, 0)
    assert (shipped.vouched, shipped.evidence) == (True, "signed-archive")
    content = managers.check_content(TOOL.encode())
    assert (content.vouched, content.evidence) == (True, "signed-archive")
    assert content.reason == f"matches the verified .deb of {PKG} 1.1"
    assert not managers.check_attributes(TOOL.encode(), 0o755, 0, 1000).vouched


def test_symlink_targets_need_the_verified_deb(system: System,
                                               debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    verdict = system.managers().check_content(LINK.encode())
    assert not verdict.vouched
    assert verdict.reason.startswith("package does not state symlink targets")
    system.publish(debs["1.1"], "1.1")
    verdict = system.managers().check_content(LINK.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive")
    os.unlink(LINK)
    os.symlink("/bin/sh", LINK)
    verdict = system.managers().check_content(LINK.encode())
    assert not verdict.vouched
    assert verdict.reason == (f"link target differs from what dpkg shipped ({PKG} 1.1, "
                              f"verified .deb)")


def test_statoverride_states_attributes(system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    dpkg_tool("dpkg-statoverride", "--update", "--add", "root", "root", "0700", TOOL)
    system.cleanups.append(lambda: dpkg_tool("dpkg-statoverride", "--remove", TOOL))
    assert os.stat(TOOL).st_mode & 0o7777 == 0o700
    managers = system.managers()
    verdict = managers.check_attributes(TOOL.encode(), 0o700, 0, 0)
    assert (verdict.vouched, verdict.evidence) == (True, "package-db")
    assert verdict.reason == "matches dpkg-statoverride (root root 0700)"
    assert not managers.check_attributes(TOOL.encode(), 0o755, 0, 0).vouched


def test_signed_archive_for_the_installed_version_only(system: System,
                                                       debs: dict[str, Path]) -> None:
    """1.0 is xz-compressed (read in-process) and listed in a gzipped index."""
    system.install(debs["1.0"])
    system.publish(debs["1.0"], "1.0")
    # In the cache, but not what is installed.
    system.publish(debs["1.1"], "1.1", compression=".gz")
    managers = system.managers()
    for path in (DATA, DROPPED, CONF):
        verdict = managers.check_content(path.encode())
        assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict
        assert verdict.reason == f"matches the verified .deb of {PKG} 1.0"
    _write(DATA, b"data of version 1.1\n")  # 1.1's content, but 1.0 is installed
    verdict = managers.check_content(DATA.encode())
    assert not verdict.vouched
    assert verdict.reason == f"content differs from what dpkg shipped ({PKG} 1.0, verified .deb)"


def test_unlisted_deb_falls_back_to_package_db(system: System,
                                               debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    system.publish(debs["1.1"], "1.1", listed_sha="0" * 64)
    managers = system.managers()
    content = managers.check_content(DATA.encode())
    assert (content.vouched, content.evidence) == (True, "package-db")
    attributes = managers.check_attributes(TOOL.encode(), 0o755, 0, 0)
    assert not attributes.vouched
    assert "is not in apt's verified package lists" in attributes.reason


def test_listed_but_corrupt_deb_falls_back_to_package_db(system: System, tmp_path: Path,
                                                         debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    corrupt = tmp_path / "corrupt.deb"
    corrupt.write_bytes(b"!<arch>\ndata.tar.xz/    0           0     0     100644  40"
                        b"        `\n" + b"not xz data at all, padded to 40 bytes.\n")
    system.publish(corrupt, "1.1")
    managers = system.managers()
    content = managers.check_content(DATA.encode())
    assert (content.vouched, content.evidence) == (True, "package-db")
    reason = managers.check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert f"cannot read {PKG}_1.1_all.deb: corrupt data.tar.xz" in reason


def test_verified_deb_overrules_a_forged_md5sums(system: System,
                                                 debs: dict[str, Path]) -> None:
    """dpkg's md5sums are root-writable: a forged entry must not launder a change."""
    system.install(debs["1.1"])
    forged = b"backdoor\n"
    _write(NOTES, forged)
    sums = Path(f"/var/lib/dpkg/info/{PKG}.md5sums")
    md5 = hashlib.md5(forged).hexdigest()
    sums.write_text("".join(
        f"{md5}  {line.split(None, 1)[1]}\n" if line.endswith("notes.txt") else line + "\n"
        for line in sums.read_text().splitlines()))
    assert system.managers().check_content(NOTES.encode()).vouched  # md5sums alone: fooled
    system.publish(debs["1.1"], "1.1")
    verdict = system.managers().check_content(NOTES.encode())
    assert not verdict.vouched
    assert verdict.reason.startswith(f"content differs from what dpkg shipped ({PKG} 1.1, "
                                     f"verified .deb); dpkg's own record matches")


def test_removals(system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.0"])
    before_upgrade = time.time()
    system.install(debs["1.1"])
    os.unlink(NOTES)
    managers = system.managers()
    dropped = managers.check_removed(DROPPED.encode(), before_upgrade, PKG)
    assert (dropped.vouched, dropped.evidence) == (True, "package-db")
    assert f"dpkg upgraded {PKG}:all 1.0 -> 1.1" in dropped.reason
    by_hand = managers.check_removed(NOTES.encode(), before_upgrade, PKG)
    assert not by_hand.vouched
    assert by_hand.reason == f"still listed by package {PKG}: its removal is not explained"
    later = managers.check_removed(DROPPED.encode(), time.time() + 2, PKG)
    assert not later.vouched
    assert later.reason == (f"owned by {PKG} when the baseline was taken, but {PKG} was "
                            "neither removed nor upgraded since")
    unowned = managers.check_removed(b"/etc/integrity-test-never-owned", before_upgrade, None)
    assert not unowned.vouched
    assert unowned.reason == ("not owned by any package when the baseline was taken: its "
                              "removal is not explained by a package")


def test_purged_package_explains_its_files(system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    since = time.time()
    system.dpkg("--purge", PKG)
    verdict = system.managers().check_removed(CONF.encode(), since, PKG)
    assert verdict.vouched and f"dpkg purged {PKG}:all 1.1" in verdict.reason
    other = system.managers().check_removed(CONF.encode(), since, "some-other-package")
    assert not other.vouched


def test_local_diversion_moves_ownership(system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    diverted = NOTES + ".distrib"
    dpkg_tool("dpkg-divert", "--local", "--rename", "--divert", diverted, "--add", NOTES)
    system.cleanups.append(
        lambda: dpkg_tool("dpkg-divert", "--local", "--rename", "--remove", NOTES))
    managers = system.managers()
    moved = managers.check_content(diverted.encode())
    assert moved.vouched and moved.package == PKG
    # What init records: the package's file under its new name, nobody's at the old.
    owners = managers.owner_map([SHARE.encode()])
    assert owners[diverted.encode()] == PKG
    assert NOTES.encode() not in owners
    assert owners[DATA.encode()] == PKG
    _write(NOTES, b"the admin's own version\n")
    system.cleanups.append(lambda: os.unlink(NOTES))
    assert managers.check_content(NOTES.encode()).reason == "not owned by any package"


def _empty_admindir(tmp_path: Path) -> Path:
    admindir = tmp_path / "dpkg"
    (admindir / "info").mkdir(parents=True)
    (admindir / "status").write_bytes(b"")
    return admindir


def test_rotated_dpkg_logs_are_read(tmp_path: Path) -> None:
    """dpkg.log, .1 and the gzipped older ones; whole seconds, local time."""
    log = tmp_path / "dpkg.log"
    log.write_text("2030-01-02 10:00:00 status installed foo:amd64 2\n")
    Path(f"{log}.1").write_text("2030-01-01 10:00:00 upgrade foo:amd64 1 2\n")
    with gzip.open(f"{log}.2.gz", "wt") as old:
        old.write("2029-06-01 10:00:00 remove bar:all 3 <none>\n"
                  "2029-06-01 10:00:01 purge bar:all 3 <none>\n")
    managers = PackageManagers(admindir=str(_empty_admindir(tmp_path)), dpkg_log=str(log),
                               rpm=None)
    assert managers.available() == ["dpkg"]

    def at(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))

    verdict = managers.check_removed(b"/gone", at("2029-06-01 10:00:00") + 0.5, "bar")
    assert verdict.reason == (
        "bar no longer ships it: dpkg removed bar:all 3 at 2029-06-01 10:00:00, "
        "dpkg purged bar:all 3 at 2029-06-01 10:00:01")
    upgraded = managers.check_removed(b"/gone", at("2029-06-01 10:00:00") + 0.5, "foo:amd64")
    assert upgraded.reason == ("foo:amd64 no longer ships it: dpkg upgraded foo:amd64 1 -> 2 "
                               "at 2030-01-01 10:00:00")
    assert not managers.check_removed(b"/gone", at("2030-01-01 10:00:01"), "foo").vouched


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 tool is not installed")
def test_apt_lists_compressed_as_apt_stores_them(tmp_path: Path,
                                                 archive_key: SigningKey) -> None:
    """apt keeps its lists lz4-compressed here (Packages.lz4): read them as apt does,
    each checked against the InRelease entry of its uncompressed index."""
    from integrity.packages.debfile import AptLists

    repo = AptRepo(tmp_path, archive_key)
    first = (packages_stanza("foo", "1:2.0-1", "amd64", "AB" * 32)
             + packages_stanza("bar", "1", "all", "cd" * 32))
    repo.publish(first, ".lz4")
    second = packages_stanza("foo", "1:2.0-1", "amd64", "ef" * 32).encode()
    (repo.lists / f"{PREFIX}main_binary-amd64_Packages.xz").write_bytes(
        lzma.compress(second))
    repo.release([("main/binary-all/Packages", first.encode()),
                  ("main/binary-amd64/Packages", second)])
    (repo.lists / f"{PREFIX}main_source_Sources").write_text(
        packages_stanza("baz", "1", "all", "00" * 32))
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
    assert lists.sha256s("foo", "1:2.0-1", "amd64") == {"ab" * 32, "ef" * 32}
    assert lists.sha256s("bar", "1", "all") == {"cd" * 32}
    assert lists.sha256s("baz", "1", "all") == set()


def test_sources_name_their_lists_as_apt_does(tmp_path: Path) -> None:
    """Signed-By is matched to the lists by apt's file naming (scheme and credentials
    dropped, "_" escaped as %5f, "/" as "_"); one-line sources too, flat ones as well."""
    from integrity.packages.aptsig import Verifier, list_prefix

    assert list_prefix("http://deb.debian.org/debian", "bookworm") == \
        "deb.debian.org_debian_dists_bookworm_"
    assert list_prefix("https://u:p@host:8080/a_b/", "x/y") == "host:8080_a%5fb_dists_x_y_"
    assert list_prefix("http://host/flat", "./") == "host_flat_._"
    assert list_prefix("http://host/flat/", "/") == "host_flat_"
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "trusted.gpg.d").mkdir()
    (etc / "trusted.gpg.d" / "global.asc").write_text("")
    (etc / "sources.list").write_text(
        "deb [arch=amd64 signed-by=/k/one.gpg] http://a.example/debian stable main\n"
        "# deb [signed-by=/k/commented.gpg] http://b.example/debian stable main\n"
        "deb http://c.example/debian stable main\n")
    (etc / "sources.list.d" / "d.sources").write_text(
        "Types: deb deb-src\nURIs: http://d.example/debian\nSuites: stable stable-updates"
        "\nComponents: main\nSigned-By: /k/two.gpg\n\nTypes: deb\nURIs: http://e.example/"
        "\nSuites: stable\nEnabled: no\nSigned-By: /k/three.gpg\n")
    verifier = Verifier(str(etc), None)
    assert verifier.keyrings_for("a.example_debian_dists_stable_InRelease") == \
        (["/k/one.gpg"], None)
    assert verifier.keyrings_for("d.example_debian_dists_stable-updates_InRelease") == \
        (["/k/two.gpg"], None)
    global_rings = ([str(etc / "trusted.gpg.d" / "global.asc")], None)
    assert verifier.keyrings_for("c.example_debian_dists_stable_InRelease") == global_rings
    assert verifier.keyrings_for("e.example_dists_stable_InRelease") == global_rings


def test_armored_and_inline_keys_verify(tmp_path: Path, archive_key: SigningKey,
                                        debs: dict[str, Path]) -> None:
    """trusted.gpg.d/*.asc (armored) for a source without Signed-By, and a key block
    written into a deb822 Signed-By field: dearmored in Python for gpgv."""
    from integrity.packages.debfile import AptLists

    repo = AptRepo(tmp_path, archive_key)
    stanza = packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"]))
    repo.publish(stanza)
    sources = repo.etc / "sources.list.d" / "test.sources"
    sources.unlink()
    (repo.etc / "sources.list").write_text(
        "deb http://deb.example.invalid/debian stable main\n")
    (repo.etc / "trusted.gpg.d").mkdir()
    armored = repo.etc / "trusted.gpg.d" / "test.asc"
    armored.write_bytes(archive_key.armored())
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(armored).check)
    assert lists.sha256s(PKG, "1.1", "all") == {sha256(debs["1.1"])}

    (repo.etc / "sources.list").unlink()
    block = archive_key.armored().decode().strip().replace("\n\n", "\n.\n")
    inline = "\n".join(" " + line for line in block.split("\n"))
    sources.write_text("Types: deb\nURIs: http://deb.example.invalid/debian\n"
                       "Suites: stable\nComponents: main\nSigned-By:\n" + inline + "\n")
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(sources).check)
    assert lists.sha256s(PKG, "1.1", "all") == {sha256(debs["1.1"])}
    # The key block is judged as the sources file it is written in.
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(armored).check)
    assert lists.sha256s(PKG, "1.1", "all") == set()


def _two_trusted_keys(tmp_path: Path, archive_key: SigningKey, other: SigningKey
                      ) -> tuple[AptRepo, list[Path]]:
    """A repository signed with `archive_key`, no sources file yet, and apt's global
    keyrings (trusted.gpg.d) holding both keys: (repository, the two keyrings)."""
    repo = AptRepo(tmp_path / "repo", archive_key)
    (repo.etc / "sources.list.d" / "test.sources").unlink()
    (repo.etc / "trusted.gpg.d").mkdir()
    rings = [repo.etc / "trusted.gpg.d" / f"{n}.asc" for n in ("archive", "other")]
    rings[0].write_bytes(archive_key.armored())
    rings[1].write_bytes(other.armored())
    return repo, rings


def test_signed_by_fingerprints_restrict_the_keys_that_may_sign(
        tmp_path: Path, archive_key: SigningKey, debs: dict[str, Path]) -> None:
    """Signed-By naming a fingerprint (sources.list(5)): apt's global keyrings, but only
    that key may sign the source's lists. Another key those keyrings trust, say a
    third party's, signing this source's lists vouches for nothing."""
    from integrity.packages.debfile import AptLists

    other = SigningKey.generate(tmp_path / "other-gnupg", "other")
    try:
        repo, rings = _two_trusted_keys(tmp_path, archive_key, other)
        stanza = packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"]))
        for named in (archive_key.fingerprint, archive_key.fingerprint.lower() + "!"):
            (repo.etc / "sources.list").write_text(
                f"deb [signed-by={named}] http://deb.example.invalid/debian stable main\n")
            repo.publish(stanza)
            lists = AptLists(str(repo.lists), str(repo.etc), Pinned(*rings).check)
            assert lists.sha256s(PKG, "1.1", "all") == {sha256(debs["1.1"])}, named
            repo.publish(stanza, sign_with=other)
            lists = AptLists(str(repo.lists), str(repo.etc), Pinned(*rings).check)
            assert lists.sha256s(PKG, "1.1", "all") == set(), named
            assert (f"signed by key {other.fingerprint}, which its source's Signed-By "
                    "does not name") in lists.why_unlisted(PKG, "1.1", "all")
    finally:
        other.stop()


def test_a_signed_by_apt_refuses_lets_no_key_sign(
        tmp_path: Path, archive_key: SigningKey, debs: dict[str, Path]) -> None:
    """A Signed-By that is neither keyring paths nor fingerprints (one written in
    gpg's groups of four, a short key id) makes apt refuse the source ("not a
    fingerprint"). Its words were dropped, leaving apt's global keyrings unrestricted:
    any key they hold vouched for the source's lists."""
    from integrity.packages.debfile import AptLists

    other = SigningKey.generate(tmp_path / "other-gnupg", "other")
    try:
        repo, rings = _two_trusted_keys(tmp_path, archive_key, other)
        stanza = packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"]))
        fpr = archive_key.fingerprint
        grouped = " ".join(fpr[i:i + 4] for i in range(0, 40, 4))
        (repo.etc / "sources.list.d" / "test.sources").write_text(
            "Types: deb\nURIs: http://deb.example.invalid/debian\nSuites: stable\n"
            f"Components: main\nSigned-By: {grouped}\n")
        for signer in (other, archive_key):
            repo.publish(stanza, sign_with=signer)
            lists = AptLists(str(repo.lists), str(repo.etc), Pinned(*rings).check)
            assert lists.sha256s(PKG, "1.1", "all") == set()
            assert "not a fingerprint: " in lists.why_unlisted(PKG, "1.1", "all")
    finally:
        other.stop()


def test_a_fingerprint_with_a_bang_refuses_its_subkeys(
        tmp_path: Path, debs: dict[str, Path]) -> None:
    """Signed-By FPR accepts signatures by the key's subkeys too; FPR! only by that
    key itself (sources.list(5)). gpg signs with the newest signing subkey."""
    from integrity.packages.debfile import AptLists

    key = SigningKey.generate(tmp_path / "gnupg", "withsub")
    try:
        key = key.add_signing_subkey()
        repo = AptRepo(tmp_path / "repo", key)
        repo.publish(packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"])))
        for named, vouched in ((key.fingerprint, True), (key.fingerprint + "!", False)):
            (repo.etc / "sources.list.d" / "test.sources").write_text(
                f"Types: deb\nURIs: {URI}\nSuites: {SUITE}\nComponents: main\n"
                f"Signed-By: {repo.keyring} {named}\n")
            lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
            found = lists.sha256s(PKG, "1.1", "all")
            assert found == ({sha256(debs["1.1"])} if vouched else set()), named
            if not vouched:
                assert "which its source's Signed-By does not name" in \
                    lists.why_unlisted(PKG, "1.1", "all")
    finally:
        key.stop()


def test_a_release_file_signed_with_a_weak_digest_vouches_for_nothing(
        tmp_path: Path, debs: dict[str, Path]) -> None:
    """gpgv still accepts a SHA-1 signature; apt refuses it ("weak digest"), and so
    do we: a collision-prone digest is not the archive's word."""
    import dataclasses

    from integrity.packages.debfile import AptLists

    key = SigningKey.generate(tmp_path / "gnupg", "rsa", algo="rsa2048")
    try:
        repo = AptRepo(tmp_path / "repo", key)
        stanza = packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"]))
        repo.publish(stanza, sign_with=dataclasses.replace(key, digest="SHA1"))
        lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
        assert lists.sha256s(PKG, "1.1", "all") == set()
        assert "signed with a weak digest (SHA1), which apt refuses" in \
            lists.why_unlisted(PKG, "1.1", "all")
        repo.publish(stanza)
        lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
        assert lists.sha256s(PKG, "1.1", "all") == {sha256(debs["1.1"])}
    finally:
        key.stop()


def test_sources_that_disagree_on_signed_by_vouch_for_nothing(
        tmp_path: Path, archive_key: SigningKey, debs: dict[str, Path]) -> None:
    """Two entries for one repository naming different Signed-By: apt refuses the
    source ("Conflicting values set for option Signed-By"). Merging them let a key
    either names sign. A tab after `deb` is a one-line source too."""
    from integrity.packages.debfile import AptLists

    repo = AptRepo(tmp_path / "repo", archive_key)
    stanza = packages_stanza(PKG, "1.1", "all", sha256(debs["1.1"]))
    repo.publish(stanza)
    (repo.etc / "sources.list").write_text(
        "deb\t[signed-by=/usr/share/keyrings/other.gpg] "
        "http://deb.example.invalid/debian stable main\n")
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
    assert lists.sha256s(PKG, "1.1", "all") == set()
    assert "its sources name different Signed-By values" in \
        lists.why_unlisted(PKG, "1.1", "all")
    (repo.etc / "sources.list").unlink()
    lists = AptLists(str(repo.lists), str(repo.etc), Pinned(repo.keyring).check)
    assert lists.sha256s(PKG, "1.1", "all") == {sha256(debs["1.1"])}


def test_release_with_a_detached_signature(system: System, debs: dict[str, Path]) -> None:
    """Release and Release.gpg instead of InRelease (older repositories): the same."""
    system.install(debs["1.1"])
    system.publish(debs["1.1"], "1.1")
    repo = system.repo
    repo.inrelease.unlink()
    release = repo.lists / f"{PREFIX}Release"
    release.write_bytes(repo.release_text)
    Path(f"{release}.gpg").write_bytes(repo.key.detach_sign(repo.release_text))
    verdict = system.managers().check_content(NOTES.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict
    release.write_bytes(repo.release_text + b"Comment: edited\n")
    reason = system.managers().check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert f"{PREFIX}Release: bad signature (BADSIG)" in reason, reason


# -- attacks on the signed-archive evidence: each was vouched for before the lists were
# -- checked against their signed InRelease with baseline-pinned keyrings.

def _plant(system: System, debs: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    """The intruder's move: a forged 1.1 whose notes.txt is a backdoor, put in apt's
    cache in place of the real one, and the live file replaced by it. Returns the
    forged .deb and the list stanza that names it."""
    files = _files("1.1")
    files[NOTES] = b"backdoor\n"
    (tmp_path / "forged").mkdir()
    forged = build_deb(tmp_path / "forged", PKG, "1.1", files, [CONF], links={LINK: "tool"})
    shutil.copy(forged, system.apt / f"{PKG}_1.1_all.deb")
    _write(NOTES, b"backdoor\n")
    return forged, packages_stanza(PKG, "1.1", "all", sha256(forged))


def _genuine(system: System, debs: dict[str, Path]) -> None:
    """1.1 installed from the genuine, signed archive: the live notes are vouched."""
    system.install(debs["1.1"])
    system.publish(debs["1.1"], "1.1")
    verdict = system.managers().check_content(NOTES.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict


def test_planted_list_stanza_gives_no_signed_evidence(system: System, tmp_path: Path,
                                                      debs: dict[str, Path]) -> None:
    _genuine(system, debs)
    _, stanza = _plant(system, debs, tmp_path)
    # The list is edited after signing; its InRelease still names the genuine index.
    system.repo.packages.write_text(stanza)
    managers = system.managers()
    verdict = managers.check_content(NOTES.encode())
    assert not verdict.vouched, verdict
    assert verdict.reason == (
        f"content differs from what dpkg shipped ({PKG} 1.1); its cached .deb is not "
        f"used: apt's verified package lists do not name {PKG} 1.1 (apt list "
        f"{PREFIX}main_binary-all_Packages does not match its InRelease)")
    attributes = managers.check_attributes(TOOL.encode(), 0o755, 0, 0)
    assert not attributes.vouched
    assert attributes.reason == (
        f"package does not state file attributes ({PKG} 1.1: apt's verified package "
        f"lists do not name {PKG} 1.1 (apt list {PREFIX}main_binary-all_Packages does "
        f"not match its InRelease); no dpkg-statoverride entry)")


def test_inrelease_edited_to_list_a_planted_index_fails_its_signature(
        system: System, tmp_path: Path, debs: dict[str, Path]) -> None:
    _genuine(system, debs)
    _, stanza = _plant(system, debs, tmp_path)
    system.repo.packages.write_text(stanza)
    genuine = hashlib.sha256("".join(system.stanzas).encode()).hexdigest()
    planted = hashlib.sha256(stanza.encode()).hexdigest()
    inrelease = system.repo.inrelease.read_bytes()
    assert genuine.encode() in inrelease
    system.repo.inrelease.write_bytes(inrelease.replace(
        genuine.encode(), planted.encode()).replace(
        f" {len(''.join(system.stanzas))} ".encode(), f" {len(stanza)} ".encode()))
    managers = system.managers()
    assert not managers.check_content(NOTES.encode()).vouched
    reason = managers.check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert f"{PREFIX}InRelease: bad signature (BADSIG)" in reason, reason


def test_text_after_the_signature_is_not_read(system: System, tmp_path: Path,
                                              debs: dict[str, Path]) -> None:
    """A SHA256 field appended after the signed part names the planted index: gpgv
    still verifies the signed part, and only that part is read."""
    _genuine(system, debs)
    _, stanza = _plant(system, debs, tmp_path)
    system.repo.packages.write_text(stanza)
    planted = hashlib.sha256(stanza.encode()).hexdigest()
    with open(system.repo.inrelease, "ab") as handle:
        handle.write(f"SHA256:\n {planted} {len(stanza)} main/binary-all/Packages\n"
                     .encode())
    reason = system.managers().check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert "does not match its InRelease" in reason, reason
    assert not system.managers().check_content(NOTES.encode()).vouched


def test_a_keyring_replaced_by_the_attackers_is_not_used(
        system: System, tmp_path: Path, debs: dict[str, Path],
        attacker_key: SigningKey) -> None:
    _genuine(system, debs)
    _, stanza = _plant(system, debs, tmp_path)
    system.repo.keyring.write_bytes(attacker_key.keyring)
    system.repo.publish(stanza, sign_with=attacker_key)
    managers = system.managers()
    assert not managers.check_content(NOTES.encode()).vouched
    reason = managers.check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert (f"{PREFIX}InRelease: no trusted keyring (keyring "
            f"{system.repo.keyring}: differs from the integrity baseline)") in reason, reason
    # Nor is a keyring of its own added beside apt's, for a source without Signed-By.
    (system.repo.etc / "sources.list.d" / "test.sources").write_text(
        "Types: deb\nURIs: http://deb.example.invalid/debian\nSuites: stable\n"
        "Components: main\n")
    (system.repo.etc / "trusted.gpg.d").mkdir()
    added = system.repo.etc / "trusted.gpg.d" / "attacker.gpg"
    added.write_bytes(attacker_key.keyring)
    reason = system.managers().check_attributes(TOOL.encode(), 0o755, 0, 0).reason
    assert f"keyring {added}: not in the integrity baseline" in reason, reason


def test_require_signed_refuses_what_only_dpkgs_database_vouches_for(
        system: System, debs: dict[str, Path]) -> None:
    system.install(debs["1.1"])
    plain = system.managers().check_content(DATA.encode())
    assert (plain.vouched, plain.evidence) == (True, "package-db")
    strict = system.managers(require_signed=True)
    verdict = strict.check_content(DATA.encode())
    assert not verdict.vouched
    assert verdict.reason == (
        f"only dpkg's database vouches for it (matches {PKG} 1.1 (dpkg md5sums); no "
        f"{PKG}_1.1_all.deb in {system.apt}), {NEED_SIGNED}")
    directory = strict.check_content(SHARE.encode())
    assert not directory.vouched and directory.reason.startswith("only dpkg's database")
    # With the signed archive at hand, files, links and directories pass on it.
    system.publish(debs["1.1"], "1.1")
    strict = system.managers(require_signed=True)
    for path in (DATA, LINK, SHARE, TOOL):
        verdict = strict.check_content(path.encode())
        assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), (path,
                                                                                 verdict)
    assert strict.check_content(SHARE.encode()).reason == \
        f"directory in the verified .deb of {PKG} 1.1"
    # dpkg-statoverride is dpkg's database too.
    dpkg_tool("dpkg-statoverride", "--update", "--add", "root", "root", "0700", TOOL)
    system.cleanups.append(lambda: dpkg_tool("dpkg-statoverride", "--remove", TOOL))
    override = system.managers(require_signed=True).check_attributes(TOOL.encode(), 0o700,
                                                                     0, 0)
    assert not override.vouched
    assert override.reason.startswith("only dpkg's database vouches for it (matches "
                                      "dpkg-statoverride (root root 0700))")


# -- replay: an older InRelease, genuinely signed, vouches only for the installs apt
# -- can have made from it (its Date before them, its Valid-Until not yet passed).

DAY = 86400.0


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _logged_install(system: System) -> float:
    """When the test's dpkg log says 1.1 was last installed (local time, whole seconds)."""
    stamps = [line[:19] for line in system.log.read_text().splitlines()
              if f" {PKG}:all " in line and line.split()[2] in ("install", "upgrade")
              and line.split()[-1] == "1.1"]
    return time.mktime(time.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S"))


def test_an_expired_inrelease_vouches_for_no_later_install(system: System,
                                                            debs: dict[str, Path]) -> None:
    """The replay: an InRelease (with its list and .deb) whose Valid-Until passed before
    dpkg installed the package is not what apt installed it from: no signed evidence,
    and the reason says it expired, and when, against the install's time."""
    system.install(debs["1.1"])
    installed = _logged_install(system)
    expired = installed - 10 * DAY
    system.publish(debs["1.1"], "1.1", date=rfc1123(installed - 30 * DAY),
                   valid_until=rfc1123(expired))
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert not verdict.vouched, verdict
    assert (f"apt's verified package lists name {PKG} 1.1, but not in a release file apt "
            f"can have installed it from ({PREFIX}InRelease expired {_utc(expired)}, "
            f"before the install of {PKG} 1.1 at {_utc(installed)})") in verdict.reason, \
        verdict.reason
    attributes = system.managers().check_attributes(TOOL.encode(), 0o755, 0, 0)
    assert not attributes.vouched and "expired" in attributes.reason, attributes
    # Valid until after the install: the same files vouch.
    system.stanzas.clear()
    system.publish(debs["1.1"], "1.1", date=rfc1123(installed - 30 * DAY),
                   valid_until=rfc1123(installed + DAY))
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict


def test_a_backdated_dpkg_log_does_not_date_the_change_before_it_was_seen(
        system: System, debs: dict[str, Path]) -> None:
    """dpkg's log is root's to edit: backdated into the old InRelease's validity, it is
    believed only as far back as the path was last seen as recorded."""
    system.install(debs["1.1"])
    installed = _logged_install(system)
    expired = installed - 10 * DAY
    system.publish(debs["1.1"], "1.1", date=rfc1123(installed - 30 * DAY),
                   valid_until=rfc1123(expired))
    forged = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(installed - 20 * DAY))
    system.log.write_text("".join(forged + line[19:] + "\n"
                                  for line in system.log.read_text().splitlines()))
    assert system.managers(require_signed=True).check_content(DATA.encode()).vouched
    seen = installed - DAY
    verdict = system.managers(require_signed=True).check_content(DATA.encode(), seen=seen)
    assert not verdict.vouched, verdict
    assert (f"{PREFIX}InRelease expired {_utc(expired)}, before the change it would "
            f"explain: the path was last seen as recorded at {_utc(seen)}") \
        in verdict.reason, verdict.reason
    # Without any logged install, an expired InRelease dates nothing either.
    system.log.write_text("")
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert not verdict.vouched, verdict
    assert (f"{PREFIX}InRelease expired {_utc(expired)}, and dpkg's log records no "
            f"install of {PKG} 1.1 to show it came before") in verdict.reason, verdict.reason


def test_lists_refreshed_after_the_install_still_vouch_for_it(
        system: System, debs: dict[str, Path]) -> None:
    # apt's daily `apt update` replaces the InRelease after every install: a newer
    # file, still valid, is the archive's word as much as the one apt installed from.
    system.install(debs["1.1"])
    installed = _logged_install(system)
    system.publish(debs["1.1"], "1.1", date=rfc1123(installed + 3600),
                   valid_until=rfc1123(installed + 10 * DAY))
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert verdict.vouched and verdict.evidence == "signed-archive", verdict


@pytest.mark.parametrize("field", ["Valid-Until: next week", "Valid-Until: Sat, 07 Dec "
                                   "2099 10:00:00 CET", "Date: 2026-12-03T00:00:00Z"])
def test_an_unreadable_release_date_vouches_for_nothing(system: System,
                                                        debs: dict[str, Path],
                                                        field: str) -> None:
    """A date apt would not read as RFC 1123 in UTC: the whole release file is refused,
    saying which field (a Valid-Until not understood cannot be enforced)."""
    system.install(debs["1.1"])
    name, _, value = field.partition(": ")
    dates = {"valid_until": value} if name == "Valid-Until" else {"date": value}
    system.publish(debs["1.1"], "1.1", **dates)
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert not verdict.vouched, verdict
    assert (f"apt list {PREFIX}main_binary-all_Packages" not in verdict.reason
            and f"{PREFIX}InRelease: {name} {value!r} is not an RFC 1123 date in UTC"
            in verdict.reason), verdict.reason


def test_without_a_package_database(tmp_path: Path) -> None:
    managers = PackageManagers(admindir=str(tmp_path / "missing"), rpm=None)
    assert managers.available() == []
    verdict = managers.check_content(b"/usr/bin/ls")
    assert not verdict.vouched and verdict.reason.startswith("no package manager available")
    assert not managers.check_removed(b"/usr/bin/ls", 0.0, "coreutils").vouched


@pytest.mark.skipif(shutil.which("rpm") is None or shutil.which("rpmbuild") is None,
                    reason="rpm and rpmbuild are not installed (Debian package 'rpm')")
def test_rpm_digests_and_attributes(tmp_path: Path) -> None:
    """An rpm installed into a private rpm database, its files into the live tree."""
    path = "/usr/share/integrity-rpm-test/file.txt"
    rpm = build_rpm(tmp_path, "integrity-rpm-test", "2.0",
                    {path: (b"from rpm\n", 0o640)})
    db = tmp_path / "rpmdb"
    db.mkdir()
    base = ["rpm", "--dbpath", str(db)]
    subprocess.run([*base, "--initdb"], check=True, capture_output=True)
    install = [*base, "-i", "--nodeps", str(rpm)]
    if subprocess.run(["rpm", "--help"], capture_output=True,
                      text=True).stdout.count("--force-debian"):
        install.insert(-1, "--force-debian")
    with exclusive():
        subprocess.run(install, check=True, capture_output=True)
        try:
            _check_rpm(tmp_path, db, path)
        finally:
            subprocess.run([*base, "-e", "--nodeps", "integrity-rpm-test"],
                           capture_output=True)
            shutil.rmtree("/usr/share/integrity-rpm-test", ignore_errors=True)


def _check_rpm(tmp_path: Path, db: Path, path: str) -> None:
    """The checks of test_rpm_digests_and_attributes, with the package installed."""
    managers = PackageManagers(admindir=str(tmp_path / "no-dpkg"), rpm="rpm",
                               rpm_dbpath=str(db))
    assert managers.available() == ["rpm"]
    verdict = managers.check_content(path.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "package-db"), verdict
    assert verdict.package == "integrity-rpm-test:noarch"
    assert managers.check_attributes(path.encode(), 0o640, 0, 0).vouched
    assert not managers.check_attributes(path.encode(), 0o644, 0, 0).vouched
    _write(path, b"tampered\n")
    changed = PackageManagers(admindir=str(tmp_path / "no-dpkg"), rpm="rpm",
                              rpm_dbpath=str(db)).check_content(path.encode())
    assert not changed.vouched
    assert changed.reason == "content differs from what rpm shipped " \
                             "(integrity-rpm-test 2.0-1)"
    assert managers.check_removed(path.encode(), 0, "integrity-rpm-test").reason \
        .startswith("still listed")
    gone = managers.check_removed(b"/usr/share/integrity-rpm-test/gone", time.time() - 600,
                                  "integrity-rpm-test")
    assert gone.vouched and "rpm installed integrity-rpm-test-2.0-1.noarch" in gone.reason


# -- attacks on the tools the signed archive is read with: gpgv and dpkg-deb count only
# -- as the baseline recorded them, with every library they load.

def test_a_library_gpgv_loads_not_as_the_baseline_recorded_it_voids_its_verdict(
        system: System, debs: dict[str, Path]) -> None:
    """gpgv itself is untouched, but libgcrypt is not what the baseline recorded (the
    record holds other bytes, as when the live library was replaced after it): gpgv's
    verdict is not used, so only dpkg's database vouches, which require_signed
    refuses. The same record again: signed-archive."""
    _genuine(system, debs)
    [lib] = [p for p in tool_files() if "/libgcrypt.so" in p]
    genuine = system.pinned.digests[lib]
    system.pinned.digests[lib] = hashlib.sha256(b"libgcrypt as recorded").digest()
    why = (f"{lib} (loaded by /usr/bin/gpgv) differs from the integrity baseline: "
           f"gpgv's word is not used (if gpgv was upgraded, approve that first: "
           f"integrity approve {lib})")
    verdict = system.managers().check_content(NOTES.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "package-db"), verdict
    strict = system.managers(require_signed=True).check_content(NOTES.encode())
    assert not strict.vouched and why in strict.reason, strict.reason
    system.pinned.digests[lib] = genuine
    verdict = system.managers(require_signed=True).check_content(NOTES.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict


def test_a_dpkg_deb_not_as_the_baseline_recorded_it_reads_no_deb(
        system: System, debs: dict[str, Path]) -> None:
    """1.1 is zstd-compressed, so its data is read through dpkg-deb: a dpkg-deb whose
    bytes differ from the baseline's record says nothing about what it holds."""
    _genuine(system, debs)
    system.pinned.digests["/usr/bin/dpkg-deb"] = hashlib.sha256(b"recorded").digest()
    verdict = system.managers(require_signed=True).check_content(DATA.encode())
    assert not verdict.vouched
    assert (f"cannot read {PKG}_1.1_all.deb: /usr/bin/dpkg-deb differs from the integrity "
            "baseline: dpkg-deb's word is not used") in verdict.reason, verdict.reason


def test_a_preloaded_library_voids_every_tools_verdict(
        system: System, debs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """/etc/ld.so.preload naming a library would load it into gpgv: while it names
    one, no tool's word is used. (A file of the test's own stands in for it: writing
    the real one would load the library into every process on the machine.)"""
    from integrity.packages import pinned

    _genuine(system, debs)
    preload = tmp_path / "ld.so.preload"
    preload.write_text("/usr/local/lib/libevil.so\n")
    monkeypatch.setattr(pinned, "PRELOAD", str(preload))
    verdict = system.managers(require_signed=True).check_content(NOTES.encode())
    assert not verdict.vouched
    assert (f"{preload} names a library that every program would load: gpgv's word is "
            "not used") in verdict.reason, verdict.reason
    preload.write_text("\n")
    verdict = system.managers(require_signed=True).check_content(NOTES.encode())
    assert (verdict.vouched, verdict.evidence) == (True, "signed-archive"), verdict
