"""The package's wings import downwards only (README, Layout): core/ ← data/ ← dialog/ ← run/."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vae_jax"
# What each wing may import of vae_jax besides itself.
ALLOWED = {"core": set(), "data": {"core"}, "dialog": {"core", "data"}}


def _vae_jax_imports(path: Path) -> set[str]:
    """The vae_jax wings (or top-level modules) a module imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vae_jax" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("wing", sorted(ALLOWED))
def test_a_wing_imports_only_the_wings_below_it(wing):
    modules = sorted((PACKAGE / wing).glob("*.py"))
    assert len(modules) > 2, f"vae_jax/{wing}/ holds {modules}"
    for path in modules:
        outside = _vae_jax_imports(path) - ALLOWED[wing] - {wing}
        assert not outside, f"{path.relative_to(PACKAGE.parent)} imports vae_jax.{outside}"


def test_only_the_dialog_wing_and_build_name_the_cvae():
    """The rest of the package reaches the dialog wing through `run/build.py`'s registry
    (and `run/config_checks.py`, which checks every task's fields before a run starts)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "dialog" or path.name in ("build.py", "config_checks.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "CVAE":
                raise AssertionError(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} names CVAE")
        assert "dialog" not in _vae_jax_imports(path), path
