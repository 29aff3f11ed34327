"""Command line: parse, call the use-case layer (integrity.ops), print, map exit codes.

`cli` is the click group (app.py); importing this package registers every command.
"""

from __future__ import annotations

from integrity.cli import baseline, content, fleet, history, host, policy, usage  # noqa: F401 - they register commands
from integrity.cli.app import Env, cli, main, pass_env

__all__ = ["Env", "cli", "main", "pass_env"]
