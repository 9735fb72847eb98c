"""README.rst is what PyPI and GitHub render: it must parse, tables and all."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_parses_without_a_warning() -> None:
    problems = io.StringIO()
    docutils.core.publish_doctree(README.read_text(), settings_overrides={
        "warning_stream": problems, "report_level": 2, "halt_level": 5})
    assert problems.getvalue() == ""
