"""Size limits on the library's code: no module in dpm_ops/ over 500 lines, no function over 80.

A function's length runs from its `def` line (decorators not counted) to its last line, nested
functions included. The test lists every violation, so one run shows all there is to split.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpm_ops"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _long_functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield node.name, node.lineno, length


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_no_module_over_500_lines():
    too_long = []
    for path in _modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{_relative(path)}: {lines} lines")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(too_long)


def test_no_function_over_80_lines():
    too_long = [
        f"{_relative(path)}:{line} {name}: {length} lines"
        for path in _modules()
        for name, line, length in _long_functions(path)
    ]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
