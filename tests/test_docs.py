"""Every test the docs name exists, so a promise never points at a test that was renamed away."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def named_tests(text: str) -> list[tuple[str, str]]:
    """``(file, test)`` for each ``tests/file.py::test`` and each ``::test`` (same file as the last one named)."""
    found, current = [], None
    for match in re.finditer(r"(tests/[\w/]+\.py)?::(\w+)", text):
        current = match.group(1) or current
        found.append((current, match.group(2)))
    return found


@pytest.mark.parametrize("doc", ["docs/RELIABILITY.md", "docs/FORMAT.md", "docs/losses.md", "README.md"])
def test_every_test_a_doc_names_exists(doc):
    missing = [
        f"{file}::{name}"
        for file, name in named_tests((ROOT / doc).read_text())
        if file is None or not re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M)
    ]
    assert not missing, missing
