"""Domains own their knowledge (docs/contributing.md): the model card, its snippets and the export ask the task (its
``library``, ``weights_source``, ``export_merged``, ``base_snippet`` ...), never which domain it is. They import no
domain module, name no domain class, and the card's two modules import each other in one direction only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_lightning"
DOMAIN_CLASSES = {"ImageClassifier", "TextClassifier", "Recommender", "ImageDataModule", "TextDataModule"}
ASKS_THE_TASK = ["card.py", "card_snippets.py", "export.py", "onnx_export.py"]


def module_file(name: str) -> Path:
    (path,) = PACKAGE.rglob(name)  # wherever the package keeps it
    return path


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or deferred into a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("name", ASKS_THE_TASK)
def test_card_and_export_import_no_domain_and_name_no_domain_class(name):
    path = module_file(name)
    domains = {
        m
        for m in imported(path)
        if m.startswith(("peft_lightning.tasks.", "peft_lightning.data."))
        and not m.startswith(("peft_lightning.tasks.base", "peft_lightning.data.checks"))
    }
    assert not domains, f"{name} imports domain modules {sorted(domains)}: ask the task (FineTuneTask's members)"
    tree = ast.parse(path.read_text())
    named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }
    assert not named & DOMAIN_CLASSES, f"{name} asks which domain a task is: {sorted(named & DOMAIN_CLASSES)}"


def test_the_card_imports_its_snippets_and_not_the_other_way():
    card, snippets = module_file("card.py"), module_file("card_snippets.py")
    assert any(m.endswith("card_snippets") for m in imported(card))
    assert not {m for m in imported(snippets) if m.endswith(".card") or ".card." in m}
