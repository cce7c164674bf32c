"""What ``export`` and the model card ask of a domain (``ExportHooks``, a base of ``FineTuneTask`` as Lightning's
``CheckpointHooks`` is of ``LightningModule``): the base model's library and source, the merged model's files and
the Python that loads them (``Snippet``), the ONNX inputs. Each domain overrides what differs (docs/contributing.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import nn

if TYPE_CHECKING:
    from pathlib import Path

    from peft_lightning.model_files.onnx_export import OnnxSpec


class Snippet(NamedTuple):
    """Python for the exported model card's "How to load" section: the import lines it needs (the card merges and
    sorts them with its own) and the code, which sets the names the card's text uses (``base``, ``merged``)."""

    imports: list[str]
    code: list[str]


class ExportHooks:
    """The members ``export`` and its model card call; defaults for a model the task builds itself."""

    library: ClassVar[str] = ""
    """The library the base model comes from, as the model card names it (``timm``, ``transformers``); "" for a model
    the task builds itself."""
    peft_task_type: ClassVar[str | None] = None
    """peft's task type of the adapters (``SEQ_CLS`` ...), saved in ``adapter_config.json`` so that
    ``PeftModel.from_pretrained`` returns the matching class; None: a plain ``PeftModel``."""

    def weights_source(self) -> str:
        """Where the base weights come from, in words (the model card's "Base model")."""
        return "the recipe's defaults"

    def hub_base_model(self) -> str | None:
        """The Hugging Face hub id of the base model, which the card's metadata links to; None: not a hub model."""
        return None

    def export_merged(self, merged: nn.Module, out: Path) -> Path:
        """Write ``merged`` (the task's model, adapters merged in: see ``export``) into the folder ``out`` in its
        library's format, and return its path. Here: its state_dict as ``model.safetensors``."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, str(out / "model.safetensors"))
        return out / "model.safetensors"

    def merged_option(self, whole_task: bool = False) -> str:
        """The ``predict`` option that loads what ``export_merged`` wrote, or with ``whole_task`` the whole task's
        weights (what ``export`` writes where more than the adapted model trained). Here: ``--model.init_from``."""
        return "--model.init_from"

    def base_snippet(self) -> Snippet:
        """The card's Python that sets ``base``, the model without adapters as training built it, onto which
        ``PeftModel.from_pretrained`` loads the export. Here: the recipe class builds it (its own ``build_model``)."""
        cls, hp = type(self), dict(self.hparams)
        names = ("model_name", "num_classes", "num_labels", "pretrained", "checkpoint_path")
        keep = {k: hp[k] for k in names if k in hp}
        return Snippet(
            [f"from {cls.__module__} import {cls.__qualname__}"],
            [
                f"base = {cls.__qualname__}({', '.join(f'{k}={v!r}' for k, v in keep.items())}).model"
                "  # the recipe's base model, without adapters"
            ],
        )

    def merged_snippet(self, path: Path) -> Snippet | None:
        """The card's Python that sets ``merged``: what ``export_merged`` wrote at ``path``, loaded with its library
        alone; None: only the recipe loads it (``merged_option``)."""
        return None

    def onnx_spec(self, model: nn.Module, data: dict[str, Any]) -> OnnxSpec:
        """What ``export --onnx`` writes of ``model`` (this task's model, adapters merged, in eval mode): the module,
        named example inputs with their dynamic axes, and the model card's lines for onnxruntime
        (``onnx_export.OnnxSpec``). ``data``: the datamodule's arguments recorded with the checkpoint (image size,
        ``max_length`` ...), empty when there are none. A domain that can be exported overrides it; here it refuses."""
        from peft_lightning.errors import UsageError

        raise UsageError(
            f"{type(self).__name__} cannot be exported to ONNX: its domain defines no ONNX inputs "
            "(FineTuneTask.onnx_spec); export without --onnx"
        )
