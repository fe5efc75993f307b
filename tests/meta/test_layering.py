"""The package's imports only run downward: util <- ops <- layers <- models <- data/training <-
evaluation/study/export <- cli (benchmarks and interop sit beside the layers they use)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ttt"
RANK = {
    "util": 0, "ops": 1, "layers": 2, "models": 3, "interop": 4, "data": 4, "training": 5,
    "benchmarks": 6, "evaluation": 6, "study": 7, "export": 7, "cli": 8, "__main__": 9, "__init__": 3,
}


def _part(module: str) -> str:
    """``ttt.training.config`` -> ``training``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports (absolute and relative, at any depth)."""
    package = ".".join(("ttt", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ttt.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:  # from . import checkpoint
                    found |= {f"{base}.{a.name}" for a in node.names}
            elif node.module and (node.module == "ttt" or node.module.startswith("ttt.")):
                found.add(node.module)
    return found


def test_imports_only_run_downward() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        here = _part(".".join(("ttt", *path.relative_to(SRC).with_suffix("").parts)))
        for target in _imports(path):
            there = _part(target)
            if there != here and RANK[there] > RANK[here]:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert not wrong, wrong


def test_the_check_sees_imports() -> None:
    found = _imports(SRC / "training" / "trainer.py")
    assert {"ttt.data", "ttt.training.checkpoint", "ttt.util.files"} <= found
