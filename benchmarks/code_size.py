"""Lines of code in a Python package: lines holding code, not counting docstrings, comments and blank lines.

A line counts when a token other than a comment, a line break or a docstring starts or runs across it
(so a statement spread over three lines counts three). Docstrings are the string statements that open a
module, class or function, as `ast.get_docstring` sees them. The count tracks the package's size from
one change to the next, with nothing to install.

Usage:
    python benchmarks/code_size.py [PACKAGE_DIR ...]   # default: pipeline/; prints each file, then the total
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def docstring_lines(tree: ast.Module) -> set[int]:
    """The line numbers that the module's, classes' and functions' docstrings span."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        if isinstance(node, kinds) and ast.get_docstring(node, clean=False) is not None:
            first = node.body[0]
            lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def count_lines(source: str) -> int:
    """The number of lines of `source` that hold code."""
    docstrings = docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docstrings)
    return len(lines)


def main() -> None:
    """Print each file's count and the total."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", type=Path, default=[REPO / "pipeline"])
    args = parser.parse_args()
    total = 0
    for package in (package.resolve() for package in args.packages):
        for path in sorted(package.rglob("*.py")):
            count = count_lines(path.read_text())
            total += count
            print(f"{count:6d}  {path.relative_to(package.parent)}")
    print(f"{total:6d}  total")


if __name__ == "__main__":
    main()
