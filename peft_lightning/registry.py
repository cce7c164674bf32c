"""Find recipes: built-in ones in the top-level ``recipes`` package, or a user's ``package.module:Class``."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    from peft_lightning.tasks.base import FineTuneTask


def builtin_names() -> list[str]:
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def get_recipe(name: str) -> type[FineTuneTask]:
    """Return the recipe class for a built-in name (``effnet_fashion``) or ``package.module:Class``.

    Example:
        >>> get_recipe("effnet_fashion").__name__  # doctest: +SKIP
        'EffnetFashion'
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(
                f"cannot import recipe {name!r} ({err}): is the module on PYTHONPATH and the class named right?"
            ) from None
    else:
        names = builtin_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)  # 0.4 offered fcos_cppe5 for 'nope'
            hint = f"did you mean {', '.join(close)}?" if close else f"known recipes: {', '.join(names)}"
            raise UsageError(f"unknown recipe {name!r}: {hint} (see `python -m peft_lightning list`)")
        cls = importlib.import_module(f"recipes.{name}").RECIPE
    from peft_lightning.tasks.base import FineTuneTask  # imports torch and lightning: after the name checks

    if not (isinstance(cls, type) and issubclass(cls, FineTuneTask)):
        raise UsageError(f"{name!r} is not a recipe: it must be a subclass of a peft_lightning task")
    return cls


def list_recipes() -> list[tuple[str, type[FineTuneTask]]]:
    """All built-in recipes as (name, class), sorted by name."""
    return [(n, get_recipe(n)) for n in builtin_names()]


@dataclass(frozen=True)
class RecipeCard:
    """What ``list`` shows of a recipe, read from its source without importing it (torch alone takes ~2 s to
    import on 2 cores; ``list`` answers in a fraction of that). tests/test_cli.py checks every built-in card
    against the imported class."""

    name: str
    domain: str
    description: str
    assets: tuple[str, ...]

    def availability(self) -> tuple[bool, str]:
        from peft_lightning.assets import check

        return check(self.assets)


def recipe_cards() -> list[RecipeCard]:
    """The built-in recipes' cards, sorted by name."""
    cards = []
    for name in builtin_names():
        attrs = _static_attrs(f"recipes.{name}", "RECIPE", ("domain", "description", "assets"))
        cards.append(
            RecipeCard(
                name, str(attrs.get("domain", "")), str(attrs.get("description", "")), tuple(attrs.get("assets", ()))
            )
        )
    return cards


def _static_attrs(module: str, name: str, wanted: tuple[str, ...], depth: int = 0) -> dict[str, Any]:
    """Class attributes ``wanted`` of ``module.name``, read from the source: literals, module constants and
    f-strings of them, inherited through the bases' imports. An attribute computed otherwise is left out."""
    if module.partition(".")[0] not in ("peft_lightning", "recipes") or depth > 8:
        return {}  # Lightning's own classes set none of them, and finding their source would import lightning
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return {}
    tree = ast.parse(Path(spec.origin).read_text())
    env: dict[str, Any] = {}
    imports: dict[str, tuple[str, str]] = {}
    classes: dict[str, ast.ClassDef] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imports.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    env[target.id] = _literal(node.value, env)
    target = env.get(name) if name == "RECIPE" else None
    cls = classes.get(target.id if isinstance(target, _Ref) else name)
    if cls is None:
        origin = imports.get(target.id if isinstance(target, _Ref) else name)
        return _static_attrs(origin[0], origin[1], wanted, depth + 1) if origin else {}
    found: dict[str, Any] = {}
    for base in reversed(cls.bases):  # the first base wins, as in the method resolution order
        if isinstance(base, ast.Name):
            origin = imports.get(base.id)
            inherited = (
                _static_attrs(origin[0], origin[1], wanted, depth + 1)
                if origin
                else _static_attrs(module, base.id, wanted, depth + 1)
            )
            found.update(inherited)
    for node in cls.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id in wanted:
                    value = _literal(node.value, env)
                    if not isinstance(value, _Ref):
                        found[target.id] = value
    return found


class _Ref(str):
    """A name whose value is not a literal (a class, a call): kept as its name."""

    @property
    def id(self) -> str:
        return str(self)


def _literal(node: ast.expr, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name):
        return env.get(node.id, _Ref(node.id))
    if isinstance(node, ast.JoinedStr):
        parts = [
            str(_literal(v.value, env)) if isinstance(v, ast.FormattedValue) else str(v.value) for v in node.values
        ]
        return "".join(parts)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, env) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _Ref(ast.unparse(node))
