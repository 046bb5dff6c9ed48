"""Importing a bench/ script in a test: `imported(name)` loads bench/NAME.py as the module NAME, registered in
sys.modules while the test uses it (its dataclasses need that), with bench/ on sys.path (the scripts import one
another by name)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


@contextmanager
def imported(name: str) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        del sys.modules[name]
