"""Running the command line in-process, as the tests do."""

from __future__ import annotations

import pytest

from lmclab.cli import main


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`main(argv)` in-process: (exit status, stdout, stderr); argparse's SystemExit is an exit status."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
