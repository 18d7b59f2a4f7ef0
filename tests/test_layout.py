"""The package's layering: production code never loads the dev fixtures (aigd.dev)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The only doors to aigd.dev, each inside the function that needs it: the CLI's dev commands
# (`aigd tiny-model`, `aigd demo-data`) and `model.build_tiny`, which a demo config sets.
ALLOWED = {("platform/aigd/cli.py", "_tiny"), ("platform/aigd/cli.py", "_demo_data"),
           ("platform/aigd/model.py", "check_available")}


def _dev_imports(path: Path) -> list[tuple[str, str]]:
    """(file, enclosing function or '<module>') of every import of aigd.dev in the file."""
    found = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            modules = []
            if isinstance(child, ast.Import):
                modules = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                modules = [child.module or ""] + [f"{child.module}.{a.name}" for a in child.names]
            if any(m == "aigd.dev" or m.startswith("aigd.dev.") for m in modules):
                found.append((str(path.relative_to(ROOT)), name))
            visit(child, name)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_production_code_never_imports_the_dev_package():
    production = [p for p in (ROOT / "platform/aigd").glob("*.py")]
    production += list((ROOT / "serve").glob("*.py")) + list((ROOT / "jobs").glob("*.py"))
    found = {hit for p in production for hit in _dev_imports(p)}
    assert found <= ALLOWED, f"production code imports aigd.dev: {sorted(found - ALLOWED)}"
    assert ("platform/aigd/model.py", "check_available") in found  # the check sees a real import
