"""The package layout is the architecture (docs/design.md, section 1): each layer imports
only from the layers below it, and the loss library knows nothing of the models."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each part of agkd_models may import from its siblings.
ALLOWED = {
    "settings": set(),
    "models": set(),
    "engine": {"settings"},
    "distillers": {"models", "engine", "settings"},
    "data": {"engine"},
    "config": {"data", "distillers", "engine", "models", "settings"},
    "experiments": {"config", "data", "distillers", "engine", "models", "settings"},
    "cli": {"config", "data", "distillers", "engine", "experiments", "models", "settings"},
    "entry": {"cli"},  # the command's entry point, above the command; the package reads its list of the train extra
    "__init__": {"data", "distillers", "engine", "entry", "experiments", "models", "settings"},
}


def _part(module: str) -> str:
    """'agkd_models.engine.trainer' -> 'engine'; 'agkd_models.cli' -> 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: str):
    """Absolute names of the modules ``path`` (in ``package``) imports."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # "from . import x": x is a module of the package
                    yield from (f"{name}.{alias.name}" for alias in node.names)
                    continue
                yield name
            else:
                yield node.module


def _modules(top: str):
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        yield path, module.removesuffix(".__init__"), package


@pytest.mark.parametrize("path,module,package", list(_modules("agkd_models")), ids=lambda v: str(v))
def test_agkd_models_layers_import_only_downwards(path, module, package):
    own = _part(module)
    for name in _imports(path, package):
        if not name.startswith("agkd_models"):
            continue
        target = _part(name)
        assert target == own or target in ALLOWED[own], f"{module} imports {name}: {own} may not use {target}"


@pytest.mark.parametrize("path,module,package", list(_modules("agkd_ops")), ids=lambda v: str(v))
def test_agkd_ops_never_imports_agkd_models(path, module, package):
    assert not [n for n in _imports(path, package) if n.startswith("agkd_models")], module


def test_the_rules_can_fail():
    # A check that cannot fail proves nothing: an upward import is caught.
    source = ROOT / "agkd_models" / "models" / "student.py"
    imported = set(_imports(source, "agkd_models.models"))
    assert "agkd_models.models.teacher" in imported  # relative imports are resolved
    assert "engine" not in ALLOWED["models"]
