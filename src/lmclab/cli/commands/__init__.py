"""Commands that live in modules of their own: each module here defines ``COMMAND = Command(...)``.

`lmclab.cli` adds every such command to the parser (after the built-in ones, by module name), so a new
command touches one new file: its flags (built from `lmclab.cli.common`, so bad values exit 2 with one
line) and a function from the parsed arguments to the result that ``--json`` prints. A user error is
raised as one of `lmclab.cli.USER_ERRORS` (`UsageError` for a bad value).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One `lmclab NAME` command: its one-line help, its flags, and what it does."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


def plugin_commands() -> tuple[Command, ...]:
    """The `COMMAND` of every module in this package, in module-name order."""
    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        command = getattr(importlib.import_module(f"{__name__}.{info.name}"), "COMMAND", None)
        if not isinstance(command, Command):
            raise TypeError(f"{__name__}.{info.name} defines no COMMAND = Command(...)")
        found.append(command)
    return tuple(found)
