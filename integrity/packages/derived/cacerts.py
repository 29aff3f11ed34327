"""/etc/ssl/certs: the links and bundle update-ca-certificates makes, made again.

The tool of the package interested in the `update-ca-certificates` trigger
(ca-certificates) runs with `--fresh` into a temporary directory (its `--etccertsdir`)
from `/etc/ca-certificates.conf` and the certificates packages ship under
`/usr/share/ca-certificates`, each of which must be its package's file, unchanged; with
no hooks (they are code from the tree being judged) and no local certificates: a
certificate dropped into `/usr/local/share/ca-certificates` is a person's act, so a
bundle or link that includes one stays open, saying so. Every changed entry of
/etc/ssl/certs is then compared with what the tool made (hash links by `openssl
rehash` included); what it did not make must be gone.
"""

from __future__ import annotations

import os

from integrity.packages.common import Verdict
from integrity.packages.derived.common import (Change, Context, file_verdict, link_verdict,
                                               not_vouched)
from integrity.packages.derived.sandbox import ToolError, unusable
from integrity.paths import display

TOOL = "update-ca-certificates"
CERTS = b"/etc/ssl/certs"
CONF = b"/etc/ca-certificates.conf"
SHARED = b"/usr/share/ca-certificates"
LOCAL = b"/usr/local/share/ca-certificates"

#: What the tool made: relative name -> link target (bytes) or file content.
Made = dict[bytes, tuple[str, bytes]]


class CaCertificates:
    """The update-ca-certificates kind (paths are parameters for other roots)."""

    name = TOOL

    def __init__(self, certs: bytes = CERTS, conf: bytes = CONF, shared: bytes = SHARED,
                 local: bytes = LOCAL) -> None:
        self.certs, self.conf, self.shared, self.local = certs, conf, shared, local

    def claims(self, change: Change) -> bool:
        return change.path.startswith(self.certs + b"/")

    def judge(self, changes: list[Change], ctx: Context) -> dict[bytes, Verdict]:
        try:
            made, how = self._make(ctx)
        except ToolError as exc:
            return {c.path: unusable(exc, c.path) for c in changes}
        locals_ = self._local_certs()
        note = (f"; {display(self.local)} holds {len(locals_)} certificate(s) no package "
                f"ships ({', '.join(display(p) for p in locals_[:3])}): check and approve "
                "by name") if locals_ else ""
        verdicts = {}
        for change in changes:
            rel = change.path[len(self.certs) + 1:]
            kind, value = made.get(rel, ("", b""))
            if kind == "link" or (not kind and change.new is not None
                                  and change.new.type == "symlink"):
                verdict = link_verdict(change, value if kind else None, TOOL, how)
            else:
                verdict = file_verdict(change, value if kind else None, TOOL, how)
            if not verdict.vouched and note:
                verdict = Verdict(False, verdict.reason + note)
            verdicts[change.path] = verdict
        return verdicts

    def _make(self, ctx: Context) -> tuple[Made, str]:
        interested = ctx.trigger_interests().get(b"update-ca-certificates", [])
        tool = next((os.fsdecode(p) for key in interested for p in ctx.package_files(key)
                     if os.path.basename(p) == os.fsencode(TOOL)), None)
        if tool is None:
            raise ToolError(f"no installed package interested in the {TOOL} trigger "
                            f"ships {TOOL}")
        count = 0
        try:
            with open(self.conf, "rb") as handle:
                lines = handle.read().split(b"\n")
        except OSError as exc:
            raise ToolError(f"cannot read {display(self.conf)}: {exc.strerror}") from None
        for line in lines:
            if not line or line[:1] in (b"#", b"!"):
                continue
            cert = os.path.normpath(os.path.join(self.shared, line))
            if not cert.startswith(self.shared + b"/"):
                raise ToolError(f"{display(self.conf)} names {display(line)}, outside "
                                f"{display(self.shared)}")
            if not os.path.exists(cert):
                continue  # the tool skips it with a warning, as dpkg leaves it
            verdict = ctx.vouched(cert)
            if not verdict.vouched:
                raise ToolError(not_vouched("the certificate", cert, verdict).reason)
            count += 1
        sandbox = ctx.sandbox
        sandbox.tool("/usr/bin/openssl")  # the tool runs `openssl rehash`
        work = sandbox.tempdir("cacerts-")
        out, empty = os.path.join(work, "certs"), os.path.join(work, "no-local")
        os.mkdir(out)
        os.mkdir(empty)
        sandbox.run([sandbox.tool(tool, interested), "--fresh",
                     "--certsconf", os.fsdecode(self.conf),
                     "--certsdir", os.fsdecode(self.shared), "--localcertsdir", empty,
                     "--etccertsdir", out, "--hooksdir", os.path.join(work, "no-hooks")],
                    cwd=work)
        made: Made = {}
        for entry in os.scandir(os.fsencode(out)):
            if entry.is_symlink():
                made[entry.name] = ("link", os.readlink(entry.path))
            elif entry.is_file():
                with open(entry.path, "rb") as handle:
                    made[entry.name] = ("file", handle.read())
        return made, f"from {count} package certificates named in {display(self.conf)}"

    def _local_certs(self) -> list[bytes]:
        found = []
        for root, _, names in os.walk(self.local, followlinks=True):
            found += sorted(os.path.join(root, n) for n in names if n.endswith(b".crt"))
        return found
