"""Imports flow one way: utils -> config -> layers -> structures -> modeling ->
{data, solver, evaluation, checkpoint} -> engine -> tools. Checked from the AST of every module's
text: nothing is imported or written under the package."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {
    "utils": 0, "config": 1, "layers": 2, "structures": 3, "modeling": 4,
    "data": 5, "solver": 5, "evaluation": 5, "checkpoint": 5, "engine": 6,
}


def _imported_packages(source: str, module_parts):
    """(line, detector subpackage) for every import of detector.* in ``source``, the text of the
    module ``module_parts`` (e.g. ("detector", "modeling", "retinanet"))."""
    tree = ast.parse(source, filename="/".join(module_parts) + ".py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(module_parts[:-1])
                base = base[: len(base) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "detector" and len(parts) > 1 and parts[1] in LAYERS:
                yield node.lineno, parts[1]


def _modules():
    return sorted((ROOT / "detector").rglob("*.py"))


def test_every_package_is_ranked():
    packages = {p.name for p in (ROOT / "detector").iterdir() if (p / "__init__.py").exists()}
    unranked = packages - set(LAYERS)
    assert not unranked, f"packages without a place in the import order: {sorted(unranked)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    parts = path.relative_to(ROOT).parts
    if len(parts) < 3:  # detector/__init__.py
        return
    own = parts[1]
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports detector.{target}"
        for line, target in _imported_packages(path.read_text(),
                                               path.relative_to(ROOT).with_suffix("").parts)
        if target != own and LAYERS[target] >= LAYERS[own]
    ]
    assert not violations, "backward or sideways import: " + "; ".join(violations)


def test_checker_catches_a_backward_import():
    probe = "from detector.data import DatasetCatalog\nfrom ..engine import hooks\n"
    found = [t for _, t in _imported_packages(probe, ("detector", "modeling", "probe"))]
    assert found == ["data", "engine"]


def test_checker_resolves_relative_imports_against_the_module():
    probe = "from . import build\nfrom ..backbone import resnet\nfrom ...layers import ShapeSpec\n"
    found = [t for _, t in _imported_packages(probe, ("detector", "modeling", "meta_arch", "m"))]
    assert found == ["modeling", "modeling", "layers"]
