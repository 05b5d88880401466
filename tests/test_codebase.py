"""Rules of the codebase that a reviewer would otherwise check by hand: short modules (the package,
benchmarks, run helpers and tests alike), a docstring at the top of each, and no in-repo module skipped
through importorskip."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("picochat", "bench", "runs", "tests")
MODULES = sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py"))
MAX_LINES = 500


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_short_and_says_what_it_is_for(path: pathlib.Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name} is over {MAX_LINES} lines: split it by concern"
    if text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path.name} has no module docstring"


def test_tests_import_our_own_modules_normally() -> None:
    pattern = "importorskip(" + '"picochat'  # split so this file does not match itself
    offenders = [p.name for p in (ROOT / "tests").glob("*.py") if pattern in p.read_text(encoding="utf-8")]
    assert not offenders, f"importorskip hides import errors of our own code: {offenders}"
