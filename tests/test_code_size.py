"""benchmarks/code_size.py counts the lines that hold code: docstrings, comments and blank lines do not count."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from workspace import REPO

SAMPLE = '''"""A module docstring
over two lines."""

import os  # a comment after code counts

# a comment alone does not


class Point:
    """One line."""

    x: int = 1


def f(a: int,
      b: int) -> str:
    """Docstring.

    More of it.
    """
    text = """a string that is not a docstring
spans two lines"""
    return text + str(a + b)
'''
SAMPLE_CODE_LINES = 8  # import os; class Point; x; def f (2 lines); text = (2 lines); return


def code_size() -> ModuleType:
    spec = importlib.util.spec_from_file_location("code_size", REPO / "benchmarks/code_size.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_a_sample_exactly() -> None:
    assert code_size().count_lines(SAMPLE) == SAMPLE_CODE_LINES


def test_prints_each_file_and_the_total(tmp_path: Path) -> None:
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""Only a docstring."""\n')
    (package / "sub" / "sample.py").write_text(SAMPLE)
    script = REPO / "benchmarks/code_size.py"
    out = subprocess.run([sys.executable, script, package], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["     0  package/__init__.py", "     8  package/sub/sample.py", "     8  total"]
