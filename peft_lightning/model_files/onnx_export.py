"""``export --onnx``: a task's merged model as ``model.onnx``, fp32, with dynamic batch (and sequence) axes.

What to export is the task's own knowledge (``FineTuneTask.onnx_spec``: the module, named example inputs, their
dynamic axes and the card's lines for onnxruntime); this module runs ``torch.onnx.export`` on it: the dynamo
exporter (``torch.export``, ``dynamic_shapes``) first, the TorchScript exporter (``dynamic_axes``) only where dynamo
fails. Neither ``onnx`` nor ``onnxscript`` is imported here at module level: ``import peft_lightning`` and
``export --help`` stay free of them. See docs/adapters.md ("Export").

Example:
    >>> spec = task.onnx_spec(merged.eval(), data={})  # doctest: +SKIP
    >>> write_onnx(spec, "out/model.onnx")  # doctest: +SKIP
    'dynamo'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peft_lightning.errors import UsageError

OUTPUT = "logits"
# How the model card names each exporter. TorchScript traces one example: shape-dependent code (a mask built for
# one sequence length) may be baked in, which torch.export would have kept symbolic.
EXPORTERS = {
    "dynamo": "torch.onnx's dynamo exporter (torch.export)",
    "torchscript": "torch.onnx's TorchScript exporter (the dynamo exporter failed; a trace of one example input, "
    "so check its logits at your input shapes)",
}


@dataclass(frozen=True)
class OnnxSpec:
    """What a task exports to ONNX (``FineTuneTask.onnx_spec``) and what the model card says about it.

    Attributes:
        module: the model in eval mode, called with the inputs positionally in the order of ``inputs``; returns
            the logits.
        inputs: example inputs by their ONNX input names (``pixel_values``; ``input_ids``, ``attention_mask`` ...).
        dynamic: each input's dynamic axes by name, e.g. ``{"input_ids": {0: "batch", 1: "sequence"}}``.
        preprocessing: one sentence for the card: how raw data becomes the inputs.
        imports: the import lines ``snippet`` needs.
        snippet: Python lines for the card that set ``feeds`` (input name -> numpy array) from example data; the
            tests run them as written.
        output_axes: the dynamic axes of the output ``logits``, whose last axis is the classes: ``{0: "batch"}``
            for one row of logits per input, ``{0: "batch", 1: "sequence"}`` for one per token.
    """

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]
    preprocessing: str
    imports: list[str]
    snippet: list[str]
    output_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})


@dataclass(frozen=True)
class OnnxWritten:
    """A written ``model.onnx``: its spec, which exporter wrote it (``dynamo`` or ``torchscript``) and the logits'
    width (classes or labels)."""

    path: Path
    spec: OnnxSpec
    exporter: str
    outputs: int

    @property
    def output_shape(self) -> str:
        """The logits' shape in words, e.g. ``[batch, 3]``."""
        return f"[{', '.join([*self.spec.output_axes.values(), str(self.outputs)])}]"


class ByName(nn.Module):
    """``model`` called with keyword inputs (a transformers model), taking them positionally in ``names`` order and
    returning its ``logits``: ``torch.export`` cannot trace a ``**kwargs`` forward."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


class _Positional(nn.Module):
    """The spec's module behind one ``*inputs`` signature, so that ``dynamic_shapes`` has one form for all."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)


def require_onnx() -> None:
    """Stop with one line when the packages ``torch.onnx.export`` needs are missing (``onnx``; ``onnxscript`` for
    the dynamo exporter)."""
    import importlib

    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(
            f"export --onnx needs {' and '.join(missing)}, not installed here: pip install 'peft_lightning[onnx]'"
        )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


def write_onnx(spec: OnnxSpec, path: str | Path) -> OnnxWritten:
    """Write ``spec.module`` to ``path`` as ONNX (fp32, the spec's dynamic axes, one output ``logits`` with the
    spec's ``output_axes``): with the dynamo exporter, else (where it fails) the TorchScript exporter; neither: one
    line saying why. The weights go into the file unless they pass ONNX's 2 GB limit (then beside it)."""
    path = Path(path)
    module = _Positional(spec.module).eval().float()
    args = tuple(spec.inputs.values())
    names = list(spec.inputs)
    with torch.no_grad():
        outputs = int(module(*args).shape[-1])
    dims: dict[str, torch.export.Dim] = {}  # one symbol per axis name: inputs that share "batch" share its size
    shapes = (
        tuple(
            {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in spec.dynamic[n].items()}
            for n in names
        ),
    )
    # The exporters' progress, deprecation and tracer warnings are noise to a user of `export`; the card says which
    # exporter wrote the file.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names,
                output_names=[OUTPUT],
                dynamic_shapes=shapes,
                verbose=False,
            )
            program.save(str(path))
            return OnnxWritten(path, spec, "dynamo", outputs)
        except Exception as err:  # torch.export refuses much (data-dependent control flow, unknown ops ...)
            dynamo_error = err
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=[OUTPUT],
                dynamic_axes={**spec.dynamic, OUTPUT: spec.output_axes},
            )
            return OnnxWritten(path, spec, "torchscript", outputs)
        except Exception as err:
            path.unlink(missing_ok=True)
            raise UsageError(
                f"cannot export {type(spec.module).__name__} to ONNX (dynamo: {_first_line(dynamo_error)}; "
                f"TorchScript: {_first_line(err)}): export without --onnx and serve the merged model with PyTorch"
            ) from None
