"""Find recipes: built-in ones in the top-level ``recipes`` package, or a user's ``package.module:Class``."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING

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
            raise UsageError(f"cannot import recipe {name!r} ({err}): is the module on PYTHONPATH and the class "
                             "named right?") from None
    else:
        names = builtin_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
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
