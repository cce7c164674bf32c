"""pyproject.toml declares what the code imports, and nothing it never imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from conftest import ROOT

# Offline assets scripts/setup.sh installs for the offline recipes: optional, never a dependency.
SETUP_ASSETS = set(re.findall(r"^have (\w+) \|\|", (ROOT / "scripts" / "setup.sh").read_text(), re.M))
# Found by Lightning by package name (its TensorBoardLogger), never imported by this project.
USED_WITHOUT_IMPORT = {"tensorboard", "pycocotools"}  # found by name by Lightning / torchmetrics


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(*folders: str) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.partition(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.partition(".")[0])
    first_party = {"peft_lightning", "recipes", "benchmarks", "conftest", "helpers"}
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    return {n for n in names if n not in sys.stdlib_module_names | first_party | local | SETUP_ASSETS}


def _distributions(modules: set[str]) -> set[str]:
    dists = packages_distributions()
    missing = sorted(m for m in modules if m not in dists)
    assert not missing, f"imported but not installed: {missing}"
    return {_norm(dists[m][0]) for m in modules}


def _declared(requirements: list[str]) -> set[str]:
    return {_norm(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def test_dependencies_are_exactly_what_the_package_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imported = _distributions(_imports("peft_lightning", "recipes"))
    declared = _declared(project["dependencies"])
    assert imported - declared == set(), "imported by the package but not declared"
    assert declared - imported - USED_WITHOUT_IMPORT == set(), "declared but never imported"


def test_tests_and_benchmarks_need_only_declared_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imported = _distributions(_imports("tests", "benchmarks", "scripts"))
    declared = _declared(project["dependencies"] + project["optional-dependencies"]["dev"])
    # pytest plugins and kernels run without being imported by name
    assert imported - declared == set()
