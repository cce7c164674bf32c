"""Parameter-efficient adapters from Hugging Face ``peft`` (LoRA, DoRA, IA3, LoHa, LoKr) for any task's backbone.

The glue between a ``FineTuneTask`` and ``peft``: which modules get adapters (the task's defaults or
``--peft.target_modules``), wrapping the backbone with ``get_peft_model`` while the classification head trains in
full (``modules_to_save``), or loading a trained adapter folder (``--peft.adapter_path``, what ``export`` writes)
with ``PeftModel.from_pretrained``; a fingerprint of the frozen base weights (an adapter-only checkpoint only makes
sense on the base it was trained on). Writing the standard ``peft`` format and a merged model is ``export.py``'s.
See docs/adapters.md.

The methods are one table, ``ADAPTER_METHODS``, as ``peft.PEFT_TYPE_TO_CONFIG_MAPPING`` is peft's: a row per
``--peft.method`` value with its peft type (hence its config class), its options and the module types it wraps;
adding a method is adding a row (docs/contributing.md).

``peft`` is imported inside the functions: importing this module (the task base does) stays cheap.

Example:
    >>> model = ImageClassifier("test_vit", num_classes=3, pretrained=False,
    ...                         peft=AdapterConfig("lora", r=4))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peft_lightning.errors import UsageError

log = logging.getLogger(__name__)


# --- the methods: one row each, in the manner of peft's PEFT_TYPE_TO_CONFIG_MAPPING ---
def _hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2-style linear


def _plain_conv(module: nn.Module) -> bool:
    """A convolution whose adapter branch gives the layer's output size: torch's own classes, or a subclass that
    pads in its own forward (timm's Conv2dSame, TF "same" padding) with a 1x1 kernel. Another kernel there gives a
    LoRA/LoHa/LoKr branch, which convolves with the layer's static padding, another output size."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return isinstance(module, conv) and (type(module) in conv or all(k == 1 for k in module.kernel_size))


def _lora_wraps(module: nn.Module) -> bool:
    """LoRA and DoRA: linears, embeddings and convolutions, not grouped (e.g. depthwise) ones."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _plain_conv(module) and module.groups == 1
    return isinstance(module, (nn.Linear, nn.Embedding)) or _hf_conv1d(module)


def _ia3_wraps(module: nn.Module) -> bool:
    """IA3 rescales the layer's output (or input): any padding and grouping is fine."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) or _hf_conv1d(module)


def _hadamard_kronecker_wraps(module: nn.Module) -> bool:
    """LoHa and LoKr: linears and 1-D/2-D convolutions, grouped ones included."""
    return isinstance(module, nn.Linear) or _plain_conv(module) and isinstance(module, (nn.Conv1d, nn.Conv2d))


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method (a ``--peft.method`` value) and what ``peft`` makes of it.

    Attributes:
        title: how the model card names it (``LoRA``).
        peft_type: peft's ``PeftType``, the key of ``peft.PEFT_TYPE_TO_CONFIG_MAPPING`` (its config class) and the
            ``peft_type`` of a saved ``adapter_config.json``.
        options: our options (``AdapterConfig``) as that config class's arguments.
        wraps: whether peft's layer for the method can wrap a module (peft 0.22).
        ranked: ``r``, ``alpha`` and ``dropout`` apply (the model card lists them).
        variant: the ``adapter_config.json`` field that tells this method from the plain one of its ``peft_type``
            (DoRA is LORA with ``use_dora``).
    """

    title: str
    peft_type: str
    options: Callable[[AdapterConfig], dict[str, Any]]
    wraps: Callable[[nn.Module], bool]
    ranked: bool = True
    variant: str | None = None


ADAPTER_METHODS: dict[str, AdapterMethod] = {
    "lora": AdapterMethod(
        "LoRA", "LORA", lambda c: {"r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout}, _lora_wraps
    ),
    "dora": AdapterMethod(
        "DoRA",
        "LORA",
        lambda c: {"r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_dora": True},
        _lora_wraps,
        variant="use_dora",
    ),
    # Outputs rescaled everywhere: no IA3 feed-forward input mode.
    "ia3": AdapterMethod("IA3", "IA3", lambda c: {"feedforward_modules": []}, _ia3_wraps, ranked=False),
    "loha": AdapterMethod(
        "LoHa", "LOHA", lambda c: {"r": c.r, "alpha": c.alpha, "module_dropout": c.dropout}, _hadamard_kronecker_wraps
    ),
    "lokr": AdapterMethod(
        "LoKr", "LOKR", lambda c: {"r": c.r, "alpha": c.alpha, "module_dropout": c.dropout}, _hadamard_kronecker_wraps
    ),
}
METHODS: tuple[str, ...] = ("none", *ADAPTER_METHODS)
# The choices of --peft.method (jsonargparse reads the Literal at run time): the table's, written once.
Method = Literal[METHODS]  # type: ignore[valid-type]


def supports(method: str, module: nn.Module) -> bool:
    """Whether ``peft``'s ``method`` can wrap ``module`` (the table's ``wraps``; False for ``none``)."""
    row = ADAPTER_METHODS.get(method)
    return row is not None and row.wraps(module)


def saved_method(saved: dict[str, Any]) -> str | None:
    """The method of a saved ``adapter_config.json`` (its ``peft_type``, and a variant's field), None if not ours."""
    rows = [
        name
        for name, row in ADAPTER_METHODS.items()
        if row.peft_type == saved.get("peft_type") and (row.variant is None or saved.get(row.variant))
    ]
    return max(rows, key=lambda name: ADAPTER_METHODS[name].variant is not None, default=None)  # DoRA over LoRA


@dataclass
class AdapterConfig:
    """Which ``peft`` adapter to add to the backbone, and where.

    Args:
        method: ``none`` (no adapters), ``lora``, ``dora`` (weight-decomposed LoRA), ``ia3`` (learned rescaling),
            ``loha`` (Hadamard product of low-rank pairs) or ``lokr`` (Kronecker product).
        r: rank of the low-rank update (lora, dora, loha, lokr).
        alpha: scaling numerator: the update is scaled by ``alpha / r`` (lora, dora, loha, lokr).
        dropout: dropout on the adapter's input (lora, dora) or of the update's modules (loha, lokr).
        target_modules: modules that get adapters: each entry is a module name, its last parts (``qkv``,
            ``attn.proj``, as in ``peft``) or a regular expression matched against whole names. None: the
            task's defaults (``default_adapter_targets``), keeping the module types the method supports.
        modules_to_save: more modules trained in full beside the head (names or last parts, as above).
        adapter_path: a trained adapter folder (``adapter_config.json`` + safetensors, as ``export`` writes it)
            to load onto the recipe's base model instead of new adapters: for ``predict``/``test`` from an export,
            or to train on from it. Its ``adapter_config.json`` sets the method, rank and targets; the options
            above are then not used (a different ``method`` stops).
    """

    method: Method = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    adapter_path: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown adapter method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UsageError(
                f"--peft.r must be >= 1, --peft.alpha > 0 and --peft.dropout in [0, 1), got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )
        if isinstance(self.target_modules, str):  # one pattern given as a string (a YAML scalar, a notebook)
            self.target_modules = [self.target_modules]

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.adapter_path is not None


def as_config(value: AdapterConfig | dict[str, Any] | None) -> AdapterConfig | None:
    """An ``AdapterConfig`` from what a checkpoint or a notebook holds; None when adapters are off."""
    if isinstance(value, dict):
        value = AdapterConfig(**value)
    return value if value is not None and value.enabled else None


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _existing(model: nn.Module, method: str, head: list[str] | tuple[str, ...] = ()) -> str:
    """A short, actionable list of the module names that exist: the last parts of adaptable ones first."""
    adaptable = [n for n, m in model.named_modules() if n and supports(method, m) and not _under(n, list(head))]
    last = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    example = f" (e.g. {adaptable[0]})" if adaptable else ""
    if last:
        return f"modules {method} can adapt, by last name: {', '.join(last[:40])}{example}"
    names = [n for n, _ in model.named_modules() if n]
    return f"modules here: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}"


def resolve_targets(
    model: nn.Module, config: AdapterConfig, defaults: str | list[str] | None, head: list[str]
) -> list[str]:
    """The full names of the modules that get adapters. A user pattern that matches nothing, or only modules the
    method cannot adapt, stops with one line listing what exists; the defaults keep what the method supports."""
    modules = {n: m for n, m in model.named_modules() if n and not _under(n, head)}
    if config.target_modules is None:
        if defaults is None:
            raise UsageError(
                f"{type(model).__name__} has no default adapter targets: pass --peft.target_modules; "
                f"{_existing(model, config.method, head)}"
            )
        patterns = [defaults] if isinstance(defaults, str) else list(defaults)
        found = [n for n, m in modules.items() if any(_matches(p, n) for p in patterns) and supports(config.method, m)]
        if not found:
            raise UsageError(
                f"the default adapter targets {patterns} match no module {config.method} can adapt "
                f"in {type(model).__name__}: pass --peft.target_modules; {_existing(model, config.method, head)}"
            )
        return found
    found = []
    for pattern in config.target_modules:
        hits = [n for n in modules if _matches(pattern, n)]
        usable = [n for n in hits if supports(config.method, modules[n])]
        if not usable:
            why = (
                f"matches only modules {config.method} cannot adapt (e.g. {hits[0]}: {type(modules[hits[0]]).__name__})"
                if hits
                else "matches no module"
            )
            raise UsageError(
                f"--peft.target_modules {pattern!r} {why} in {type(model).__name__}; "
                f"{_existing(model, config.method, head)}"
            )
        if len(usable) < len(hits):
            log.warning(
                "--peft.target_modules %r: %d of %d matching modules cannot take %s and keep no adapter",
                pattern,
                len(hits) - len(usable),
                len(hits),
                config.method,
            )
        found += [n for n in usable if n not in found]
    return found


def peft_config(
    config: AdapterConfig, targets: list[str], modules_to_save: list[str], task_type: str | None = None
) -> Any:
    """The ``peft`` config for ``config`` with explicit target module names (``task_type``: peft's, e.g. ``SEQ_CLS``
    for a transformers classifier, so ``PeftModel.from_pretrained`` gives the matching model class): the config
    class ``peft.PEFT_TYPE_TO_CONFIG_MAPPING`` holds for the method's ``peft_type``, with the method's options."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    method = ADAPTER_METHODS[config.method]
    return PEFT_TYPE_TO_CONFIG_MAPPING[method.peft_type](
        target_modules=targets, modules_to_save=modules_to_save or None, task_type=task_type, **method.options(config)
    )


def wrap(
    model: nn.Module,
    config: AdapterConfig,
    *,
    default_targets: str | list[str] | None,
    head: list[str],
    base_name: str | None = None,
    task_type: str | None = None,
) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model``: base weights frozen, adapters on the targets, ``head`` (module
    names) and ``config.modules_to_save`` trained in full. With ``config.adapter_path``, the saved adapter is
    loaded instead (``load_adapter``)."""
    import peft

    missing = [h for h in head if h not in dict(model.named_modules())]
    if missing:
        raise UsageError(f"head module(s) {missing} not found in {type(model).__name__}")
    if config.adapter_path is not None:
        return load_adapter(model, config, head)
    extra = []
    for pattern in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and _matches(pattern, n)]
        if not hits:
            raise UsageError(f"--peft.modules_to_save {pattern!r} matches no module; {_existing(model, config.method)}")
        extra += hits
    keep = list(dict.fromkeys([*head, *extra]))
    targets = resolve_targets(model, config, default_targets, keep)
    try:
        wrapped = peft.get_peft_model(model, peft_config(config, targets, keep, task_type))
    except (ValueError, TypeError) as err:  # peft refuses a layer type or an option combination
        raise UsageError(f"peft cannot add {config.method} adapters here: {str(err).splitlines()[0][:300]}") from None
    if base_name is not None:  # informative, in adapter_config.json (timm models carry no name_or_path)
        wrapped.peft_config["default"].base_model_name_or_path = base_name
    return wrapped


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder; stops with one line if there is none."""
    import json

    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise UsageError(
            f"--peft.adapter_path {str(path)!r} has no adapter_config.json: pass a folder written by "
            "`python -m peft_lightning export` (or peft's save_pretrained)"
        )
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {str(file)!r} ({type(err).__name__}): is it a peft adapter folder?") from None


def load_adapter(model: nn.Module, config: AdapterConfig, head: list[str]) -> nn.Module:
    """``PeftModel.from_pretrained(model, config.adapter_path)``, trainable, after checking that the folder holds
    a method this project knows and trains the head; ``config.method`` is set from the folder."""
    import peft

    saved = read_adapter_config(config.adapter_path)
    method = saved_method(saved)
    if method is None:
        raise UsageError(
            f"--peft.adapter_path {config.adapter_path!r} holds a {saved.get('peft_type')} adapter: "
            f"only {', '.join(METHODS[1:])} are supported"
        )
    if config.method not in ("none", method):
        raise UsageError(
            f"--peft.adapter_path {config.adapter_path!r} holds a {method} adapter, not "
            f"{config.method}: drop --peft.method or pass --peft.method {method}"
        )
    saved_heads = saved.get("modules_to_save") or []
    untrained = [h for h in head if not any(h == s or h.endswith("." + s) for s in saved_heads)]
    if untrained:
        raise UsageError(
            f"the adapter in {config.adapter_path!r} does not hold the head {untrained} (its "
            f"modules_to_save: {saved_heads}): it was not trained for this task"
        )
    try:
        wrapped = peft.PeftModel.from_pretrained(model, config.adapter_path, is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as err:  # other targets, shapes (num_classes) or base
        raise UsageError(
            f"cannot load the adapter in {config.adapter_path!r} onto {type(model).__name__} "
            f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}): was it "
            "exported from this recipe with the same model and number of classes?"
        ) from None
    config.method = method  # what checkpoints and messages report
    return wrapped


def is_peft(module: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # peft was imported if any module was wrapped
    return peft is not None and isinstance(module, peft.PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone (with its adapter layers) inside a ``PeftModel``; ``model`` itself otherwise."""
    return model.get_base_model() if is_peft(model) else model


def inner_prefix(model: nn.Module) -> str:
    """What a ``PeftModel`` puts before the backbone's parameter names."""
    return "base_model.model." if is_peft(model) else ""


def find(task: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute prefix, PeftModel) of the wrapped backbone inside ``task``, or None."""
    for name, module in task.named_modules():
        if is_peft(module):
            return (name + "." if name else ""), module
    return None


def trainable_names(task: nn.Module) -> set[str] | None:
    """Full names of the parameters that may ever train under adapters: the adapters, the head and other
    ``modules_to_save`` copies (peft's own split). None: no adapters, everything may train."""
    found = find(task)
    if found is None:
        return None
    prefix, model = found
    adapter_prefix = model.base_model.prefix  # "lora_", "ia3_", "hada_", "lokr_": peft's adapter parameter names
    return {
        prefix + name
        for name, _ in model.named_parameters()
        if adapter_prefix in name or ".modules_to_save." in f".{name}"
    }


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the frozen base weights, so an adapter-only checkpoint is never put on another base."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        # Flattened first: a channels-last (N, C, 1, 1) weight counts as contiguous yet has no unit stride.
        t = tensors[name].detach().to("cpu").reshape(-1).contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
