"""User-facing errors.

Contract: every problem with the user's input (a bad path, a malformed checkpoint, an unknown model type, a
destination that exists) raises `ConvertError` whose message is ONE line saying what is wrong and how to fix it.
The CLI prints it and exits with code 2 (no traceback unless `--debug`). A bit-level mismatch found by `verify`
is not an error of the input and is reported with exit code 1 instead.
"""

from __future__ import annotations


class ConvertError(Exception):
    """Bad input or usage: one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class MappingError(ConvertError):
    """A checkpoint's keys do not fit the model type's mapping (missing/duplicate experts, mixed layouts...)."""
