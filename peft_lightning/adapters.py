"""Parameter-efficient adapters from Hugging Face ``peft`` (LoRA, DoRA, IA3, LoHa, LoKr) for any task's backbone.

The glue between a ``FineTuneTask`` and ``peft``: which modules get adapters (the task's defaults or
``--peft.target_modules``), wrapping the backbone with ``get_peft_model`` while the classification head trains in
full (``modules_to_save``), a fingerprint of the frozen base weights (an adapter-only checkpoint only makes sense
on the base it was trained on), and the export of the standard ``peft`` format and of a merged model.

``peft`` is imported inside the functions: importing this module (the task base does) stays cheap.

Example:
    >>> model = ImageClassifier("test_vit", num_classes=3, pretrained=False,
    ...                         peft=AdapterConfig("lora", r=4))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peft_lightning.errors import UsageError

log = logging.getLogger(__name__)

Method = Literal["none", "lora", "dora", "ia3", "loha", "lokr"]
METHODS: tuple[str, ...] = ("none", "lora", "dora", "ia3", "loha", "lokr")


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
    """

    method: Method = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown adapter method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UsageError(f"--peft.r must be >= 1, --peft.alpha > 0 and --peft.dropout in [0, 1), got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")
        if isinstance(self.target_modules, str):  # one pattern given as a string (a YAML scalar, a notebook)
            self.target_modules = [self.target_modules]

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def as_config(value: AdapterConfig | dict[str, Any] | None) -> AdapterConfig | None:
    """An ``AdapterConfig`` from what a checkpoint or a notebook holds; None when adapters are off."""
    if isinstance(value, dict):
        value = AdapterConfig(**value)
    return value if value is not None and value.enabled else None


# --- which modules a method can adapt (peft 0.21) ---
def supports(method: str, module: nn.Module) -> bool:
    """Whether ``peft``'s ``method`` can wrap ``module``. LoRA and DoRA refuse grouped (e.g. depthwise)
    convolutions; IA3, LoHa and LoKr take them."""
    conv1d_hf = type(module).__name__ == "Conv1D"  # transformers' GPT-2-style linear
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    # A conv subclass that pads in its own forward (timm's Conv2dSame, TF "same" padding) gives a LoRA/LoHa/LoKr
    # branch, which convolves with the layer's static padding, another output size, unless the kernel is 1x1.
    plain_conv = conv and (type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or all(k == 1 for k in module.kernel_size))
    if method in ("lora", "dora"):
        if conv:
            return plain_conv and module.groups == 1
        return isinstance(module, (nn.Linear, nn.Embedding)) or conv1d_hf
    if method == "ia3":  # rescales the layer's output (or input): any padding is fine
        return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) or conv1d_hf
    if method in ("loha", "lokr"):
        return isinstance(module, nn.Linear) or plain_conv and isinstance(module, (nn.Conv1d, nn.Conv2d))
    return False


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


def resolve_targets(model: nn.Module, config: AdapterConfig, defaults: str | list[str] | None,
                    head: list[str]) -> list[str]:
    """The full names of the modules that get adapters. A user pattern that matches nothing, or only modules the
    method cannot adapt, stops with one line listing what exists; the defaults keep what the method supports."""
    modules = {n: m for n, m in model.named_modules() if n and not _under(n, head)}
    if config.target_modules is None:
        if defaults is None:
            raise UsageError(f"{type(model).__name__} has no default adapter targets: pass --peft.target_modules; "
                             f"{_existing(model, config.method, head)}")
        patterns = [defaults] if isinstance(defaults, str) else list(defaults)
        found = [n for n, m in modules.items() if any(_matches(p, n) for p in patterns)
                 and supports(config.method, m)]
        if not found:
            raise UsageError(f"the default adapter targets {patterns} match no module {config.method} can adapt "
                             f"in {type(model).__name__}: pass --peft.target_modules; {_existing(model, config.method, head)}")
        return found
    found = []
    for pattern in config.target_modules:
        hits = [n for n in modules if _matches(pattern, n)]
        usable = [n for n in hits if supports(config.method, modules[n])]
        if not usable:
            why = (f"matches only modules {config.method} cannot adapt (e.g. {hits[0]}: "
                   f"{type(modules[hits[0]]).__name__})" if hits else "matches no module")
            raise UsageError(f"--peft.target_modules {pattern!r} {why} in {type(model).__name__}; "
                             f"{_existing(model, config.method, head)}")
        if len(usable) < len(hits):
            log.warning("--peft.target_modules %r: %d of %d matching modules cannot take %s and keep no adapter",
                        pattern, len(hits) - len(usable), len(hits), config.method)
        found += [n for n in usable if n not in found]
    return found


def peft_config(config: AdapterConfig, targets: list[str], modules_to_save: list[str]) -> Any:
    """The ``peft`` config for ``config`` with explicit target module names."""
    import peft

    common: dict[str, Any] = {"target_modules": targets, "modules_to_save": modules_to_save or None}
    if config.method in ("lora", "dora"):
        return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               use_dora=config.method == "dora", **common)
    if config.method == "ia3":
        return peft.IA3Config(feedforward_modules=[], **common)  # rescale outputs everywhere: no IA3 FFN input mode
    if config.method == "loha":
        return peft.LoHaConfig(r=config.r, alpha=config.alpha, module_dropout=config.dropout, **common)
    return peft.LoKrConfig(r=config.r, alpha=config.alpha, module_dropout=config.dropout, **common)


def wrap(model: nn.Module, config: AdapterConfig, *, default_targets: str | list[str] | None, head: list[str],
         base_name: str | None = None) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model``: base weights frozen, adapters on the targets, ``head`` (module
    names) and ``config.modules_to_save`` trained in full."""
    import peft

    missing = [h for h in head if h not in dict(model.named_modules())]
    if missing:
        raise UsageError(f"head module(s) {missing} not found in {type(model).__name__}")
    extra = []
    for pattern in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and _matches(pattern, n)]
        if not hits:
            raise UsageError(f"--peft.modules_to_save {pattern!r} matches no module; {_existing(model, config.method)}")
        extra += hits
    keep = list(dict.fromkeys([*head, *extra]))
    targets = resolve_targets(model, config, default_targets, keep)
    try:
        wrapped = peft.get_peft_model(model, peft_config(config, targets, keep))
    except (ValueError, TypeError) as err:  # peft refuses a layer type or an option combination
        raise UsageError(f"peft cannot add {config.method} adapters here: {str(err).splitlines()[0][:300]}") from None
    if base_name is not None:  # informative, in adapter_config.json (timm models carry no name_or_path)
        wrapped.peft_config["default"].base_model_name_or_path = base_name
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
    return {prefix + name for name, _ in model.named_parameters()
            if adapter_prefix in name or ".modules_to_save." in f".{name}"}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the frozen base weights, so an adapter-only checkpoint is never put on another base."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        # Flattened first: a channels-last (N, C, 1, 1) weight counts as contiguous yet has no unit stride.
        t = tensors[name].detach().to("cpu").reshape(-1).contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --- export ---
def export(task: nn.Module, out: str | Path, merge: bool = False) -> list[Path]:
    """Write the task's adapter in the standard ``peft`` format (``adapter_config.json`` and
    ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, out)`` loads) and, with ``merge``, the
    merged full model: ``save_pretrained`` for transformers models, else a safetensors state_dict
    (``model.safetensors``). A task without adapters can only be exported merged (its plain weights)."""
    from safetensors.torch import save_file

    out = Path(out)
    found = find(task)
    if found is None and not merge:
        raise UsageError("this checkpoint has no adapters (trained with --peft.method none): pass --merge to export "
                         "its full weights")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if found is not None:
        model = found[1]
        model.save_pretrained(str(out))
        written += [out / "adapter_config.json", out / "adapter_model.safetensors"]
        merged = copy.deepcopy(model).merge_and_unload() if merge else None
    else:
        merged = copy.deepcopy(getattr(task, "model", task)) if merge else None
    if merged is not None:
        if hasattr(merged, "save_pretrained"):  # transformers: config + safetensors, loadable by from_pretrained
            merged.save_pretrained(str(out / "merged"))
            written.append(out / "merged")
        else:
            save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, str(out / "model.safetensors"))
            written.append(out / "model.safetensors")
    return written


def load_task(recipe: type, ckpt_path: str | Path) -> Any:
    """The recipe's task restored from a Lightning checkpoint (adapter-only or full), in eval mode, on the CPU."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass the path of a .ckpt file from fit")
    try:
        task = recipe.load_from_checkpoint(str(path), map_location="cpu")
    except UsageError:
        raise
    except Exception as err:  # unpickling a damaged file raises many types; all mean "cannot use this file"
        raise UsageError(f"cannot load checkpoint {str(path)!r} into recipe {recipe.__name__} "
                         f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}): "
                         "is it corrupt, or from another recipe?") from None
    return task.eval()
