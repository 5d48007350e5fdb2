"""stdout that cannot take the output: its reader went away (`| head`) or it was closed
before the start (`>&-`). Either way nobody reads what is written; what a command makes of
that is its own (a dry run or `status` stops quietly, a real run has stored its rows)."""

from __future__ import annotations

import errno
import io
import os
import sys

STDOUT_FD = 1


class _NoReader(io.TextIOBase):
    """sys.stdout when descriptor 1 was closed at start-up: writing fails as into a pipe whose
    reader went away, so every command handles both alike."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "stdout was closed before the start")

    def fileno(self) -> int:
        return STDOUT_FD


def guard_closed_stdout() -> None:
    """stdout closed before the start: Python leaves sys.stdout None, and the next socket or
    file the command opens would take descriptor 1. Hold it with /dev/null instead, and make
    writing to stdout a broken pipe."""
    if sys.stdout is not None:
        return
    _devnull_onto(STDOUT_FD)
    sys.stdout = _NoReader()


def stdout_closed_at_start() -> bool:
    """Whether descriptor 1 was closed before the start (`>&-`): nobody can read any output,
    so a command whose exit status is its verdict need not write it. (Python leaves the
    original stream None then; guard_closed_stdout and masking replace only sys.stdout.)"""
    return sys.__stdout__ is None


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    _devnull_onto(sys.stdout.fileno())


def _devnull_onto(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)
