"""telechat_lab's modules import only downward: the graph of every import (module-level, in functions, in
`__main__` blocks) between its modules has no cycle."""

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "telechat_lab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the telechat_lab modules it imports}. `from a import b` is an import of `a.b` when that is a
    module, else of `a`; the parent packages an import also runs are not counted (they import downward)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names
                )
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "telechat_lab.tiny" in graph["telechat_lab.resolve"]  # inside model_dir()
    assert "telechat_lab.chat.session" in graph["telechat_lab.chat"]  # `from .session import ChatSession`
    assert "telechat_lab.cli" in graph["telechat_lab.data.inspect.__main__"]  # the program's own entry


def test_no_import_cycle():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
    assert order.index("telechat_lab.errors") < order.index("telechat_lab.cli")
