"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations


class VitshrinkError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits with code 2."""

    exit_code = 2
