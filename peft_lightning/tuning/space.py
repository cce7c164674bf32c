"""The search space: ``fit`` flag names mapped to Optuna distributions, from the recipe and a YAML file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

SPACE_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
# Flags a space may not set: they pick the recipe, or would let a trial see the test set or resume another run.
RESERVED = {"recipe", "config", "print_config", "test_after_fit", "ckpt_path"}


def load_space(
    defaults: Mapping[str, Any], override: str | Path | Mapping[str, Any] | None = None
) -> dict[str, BaseDistribution]:
    """The recipe's space ``defaults`` updated by ``override`` (a YAML file or a mapping), as Optuna distributions.

    Both map ``fit`` flag names to ``{type: float|int, low, high, log, step}`` or ``{type: categorical, choices}``;
    ``null`` drops a key of the defaults. Categorical choices that are lists or mappings (``target_modules``) travel
    as JSON strings: Optuna's categorical values are scalars.

    Raises:
        UsageError: unparsable YAML, an unknown type or option, or values Optuna's distributions refuse (low > high,
            log with low <= 0 ...). Flag names are checked later, against the parser (``trial._check_flags``).

    Example:
        >>> load_space({"model.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        ...            {"peft.r": {"type": "categorical", "choices": [4, 8]}})  # doctest: +SKIP
    """
    source = "the recipe's search_space"
    specs: dict[str, Any] = {str(k).removeprefix("--"): v for k, v in defaults.items()}
    if override is not None:
        if isinstance(override, Mapping):
            source, loaded = "the space", dict(override)
        else:
            import yaml

            source = str(override)
            try:
                loaded = yaml.safe_load(Path(override).read_text())
            except OSError as err:
                raise UsageError(f"cannot read space file {source!r}: {err.strerror or err}") from None
            except yaml.YAMLError as err:
                raise UsageError(f"cannot parse space file {source!r}: {' '.join(str(err).split())[:300]}") from None
        if not isinstance(loaded, Mapping):
            raise UsageError(
                f"space file {source!r} must map fit flags to distributions, e.g. "
                "'model.lr: {type: float, low: 1e-4, high: 1e-2, log: true}'"
            )
        for key, spec in loaded.items():
            key = str(key).removeprefix("--")
            if spec is None:
                specs.pop(key, None)
            else:
                specs[key] = spec
    space = {key: _distribution(key, spec, source) for key, spec in specs.items()}
    if not space:
        raise UsageError("the search space is empty: pass --space FILE (see docs/tune.md)")
    return space


def _distribution(key: str, spec: Any, source: str) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"{source}: {key}"
    if key in RESERVED:
        raise UsageError(f"{where}: {key!r} is set by tune itself and cannot be searched")
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in SPACE_KEYS:
        raise UsageError(
            f"{where}: unknown type {kind!r}: use float, int or categorical, e.g. "
            "{type: float, low: 1e-4, high: 1e-2, log: true}"
        )
    unknown = set(spec) - SPACE_KEYS[kind] - {"type"}
    if unknown:
        raise UsageError(
            f"{where}: unknown option(s) {', '.join(sorted(map(str, unknown)))} for type {kind}: "
            f"use {', '.join(sorted(SPACE_KEYS[kind]))}"
        )
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("choices must be a non-empty list")
            return CategoricalDistribution(
                [c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c) for c in choices]
            )
        if "low" not in spec or "high" not in spec:
            raise ValueError("needs low and high")
        # YAML reads 1e-4 (no dot) as a string: numbers are converted here, not compared as text.
        number = int if kind == "int" else float
        low, high = number(spec["low"]), number(spec["high"])
        step = None if spec.get("step") is None else number(spec["step"])
        if low > high:
            raise ValueError(f"low {low:g} > high {high:g}")
        if kind == "int":
            return IntDistribution(low, high, log=bool(spec.get("log", False)), step=step or 1)
        return FloatDistribution(low, high, log=bool(spec.get("log", False)), step=step)
    except (TypeError, ValueError) as err:  # Optuna's own checks: log with low <= 0, a step with log ...
        raise UsageError(f"{where}: {err}") from None


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    """The trial's value of ``key``: Optuna's ``suggest_*`` for the distribution."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def flag(key: str, value: Any) -> str:
    """One ``--key=value`` for jsonargparse: strings as they are (a JSON list stays one), the rest as JSON."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def samples(space: Mapping[str, BaseDistribution]) -> Iterator[list[str]]:
    """Flag lists that visit every categorical choice and both ends of every range (to parse before any trial)."""
    from optuna.distributions import CategoricalDistribution

    n = max([2, *(len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution))])
    for i in range(n):
        flags = []
        for key, dist in space.items():
            if isinstance(dist, CategoricalDistribution):
                flags.append(flag(key, dist.choices[min(i, len(dist.choices) - 1)]))
            else:
                flags.append(flag(key, dist.high if i == 1 else dist.low))
        yield flags
