"""docs/guarantees.md names, for every guarantee, the tests that prove it: each named test
must exist, or the document promises a proof nobody runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/file.py::test` names a file and a test; a following `::test` is in the same file.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`")


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None for the whole file) for every reference, row by row."""
    named = []
    for row in text.splitlines():
        current = None
        for match in REFERENCE.finditer(row):
            if match.group(1):
                current = match.group(1)
                named.append((current, match.group(2)))
            else:
                assert current is not None, f"`::{match.group(3)}` names no file: {row[:80]}"
                named.append((current, match.group(3)))
    return named


def test_every_test_the_guarantees_name_exists() -> None:
    named = named_tests((ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8"))
    assert len(named) > 100
    missing = [
        f"{file}::{test}" if test else file
        for file, test in named
        if not (ROOT / file).is_file()
        or (test and not re.search(rf"^(async )?def {test}\(", (ROOT / file).read_text(), re.M))
    ]
    assert missing == []
