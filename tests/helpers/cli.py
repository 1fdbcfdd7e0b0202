"""Run the `vitshrink` command line in-process, as a user would, and capture what it prints."""

from __future__ import annotations

import pytest

from vitshrink.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``vitshrink ARGS``."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
