"""The base every domain task shares: recipe metadata, the fine-tuning contract's state, adapters and checkpoints
(its optimizer is ``optim.py``'s, and what ``export`` asks of it ``export_hooks.py``'s).

A *recipe* is a subclass of a domain task (``FineTuneTask`` → ``ImageClassifier`` → ``EffnetFashion``) that
sets the class attributes below, its defaults included (``model_defaults``, ``data_defaults``, ``trainer_defaults``,
``finetuning_defaults``); the CLI reads them to build its parser, and a notebook uses the same class directly.
``FineTuneTask`` keeps the fine-tuning contract (``peft_lightning/contract.py``) for every domain.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from peft_lightning import internals
from peft_lightning.adapters import AdapterConfig
from peft_lightning.contract import LayerGroups, LRScales
from peft_lightning.data.checks import data_spec
from peft_lightning.tasks import optim
from peft_lightning.tasks.export_hooks import ExportHooks, Snippet  # noqa: F401  (Snippet: domains import it here)

if TYPE_CHECKING:
    from peft_lightning.callbacks.prefix_cache import PrefixCache
    from peft_lightning.prefix import Split


def _init_with_defaults(cls: type) -> Any:
    """``cls.__init__``: the parent's, with ``cls.model_defaults`` for the arguments not given. The parameters
    jsonargparse reads through ``super().__init__(**kwargs)``, as for a hand-written ``__init__``; the CLI sets the
    defaults it shows from ``model_defaults``. ``super()`` reads the ``__class__`` cell below, which is also what
    Lightning's ``save_hyperparameters`` looks for to record the arguments of each ``__init__`` in the chain."""
    defaults = cls.__dict__["model_defaults"]
    __class__ = cls  # noqa: F841  (the cell of the zero-argument super() in __init__)

    def __init__(self: Any, **kwargs: Any) -> None:
        for name, value in defaults.items():
            kwargs.setdefault(name, value)
        super().__init__(**kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


class FineTuneTask(ExportHooks, LightningModule):
    """Base LightningModule of every domain: optimizer, LR schedule and parameter groups named by layer group.

    Args:
        optimizer: ``adamw``, ``adam`` or ``sgd`` (with Nesterov momentum).
        lr: peak learning rate of the head; lower groups get ``lr * lr_scales.factor(group)``.
        weight_decay: decoupled weight decay; never applied to biases and normalisation weights.
        momentum: SGD momentum (ignored by Adam/AdamW).
        scheduler: LR shape after warmup: ``cosine``, ``linear`` (both decay to ``min_lr_ratio * lr``),
            ``constant``, ``onecycle`` (torch's OneCycleLR LR shape, momentum not cycled; ``warmup`` is its
            rising part, 0.3 of the run when 0) or ``plateau``
            (ReduceLROnPlateau on the recipe's monitored metric, halving the LR after 1 flat epoch; no warmup).
        warmup: warmup length: a fraction of all training steps if < 1, else a number of steps.
        min_lr_ratio: the LR at the end of the decay, as a fraction of the peak.
        peft: parameter-efficient adapters from ``peft`` on the backbone (``--peft.method lora --peft.r 8``);
            None or method ``none``: every weight may train. With adapters, only the adapters and the head ever
            train, and checkpoints hold only them (the base is re-created from the recipe's pretrained source).
        scale_lr: scale ``lr`` with the global batch (per-device batch x devices x nodes x accumulation) relative
            to ``reference_batch()``: ``linear`` (SGD), ``sqrt`` (Adam/AdamW) or ``none`` (see docs/parallel.md).
        compile: ``torch.compile`` the model's blocks (``fsdp_block_classes``) in place before training.
        activation_checkpointing: recompute each block's activations in the backward pass (less memory, ~30%
            more compute), through FSDP's ``activation_checkpointing_policy``: needs ``--trainer.strategy fsdp``.
    """

    # --- recipe metadata (read by the CLI and `list`; recipes override) ---
    domain: ClassVar[str] = ""
    description: ClassVar[str] = ""
    datamodule_class: ClassVar[type[LightningDataModule] | None] = None
    model_defaults: ClassVar[dict[str, Any]] = {}
    """The recipe's values for its own ``__init__`` arguments (``{"lr": 2e-3, "scheduler": "onecycle"}``), as
    ``data_defaults``, ``trainer_defaults`` and ``finetuning_defaults`` are for the datamodule, the Trainer and the
    ``FineTuning`` callback: the CLI shows them in ``--help`` and ``--print_config``, and a class that sets them
    fills them in when built in Python (``EffnetFashion()``), so its saved hyperparameters hold them. A class that
    adds arguments writes an ``__init__`` with their defaults instead; an inherited argument given a default there
    takes its place here (see ``__init_subclass__``)."""
    data_defaults: ClassVar[dict[str, Any]] = {}
    trainer_defaults: ClassVar[dict[str, Any]] = {}
    finetuning_defaults: ClassVar[dict[str, Any]] = {}
    assets: ClassVar[tuple[str, ...]] = ()
    """What the recipe's defaults load, by the names of ``peft_lightning.assets`` (``fashion_mnist``,
    ``hub-model:ORG/NAME`` ...): ``list`` and ``availability()`` say whether they are here."""
    monitor: ClassVar[str] = "val/acc"
    monitor_mode: ClassVar[Literal["min", "max"]] = "max"
    default_adapter_targets: ClassVar[str | list[str] | None] = None
    """Modules that get adapters when ``--peft.target_modules`` is not given (names, last parts or regexes; only
    the module types a method supports are kept). None: the user must name them."""
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "model.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "model.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        "model.warmup": {"type": "float", "low": 0.0, "high": 0.2},
    }
    """What ``tune`` searches by default: ``fit`` flag names mapped to Optuna distributions (``type: float`` or
    ``int`` with ``low``, ``high`` and optional ``log``/``step``; ``type: categorical`` with ``choices``). A
    ``--space`` file overrides or extends it (docs/tune.md); recipes override it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # One road for a model default: `model_defaults`. A class that sets it gets an `__init__` that fills it in;
        # a class that writes its own `__init__` (to add arguments) sets defaults in that signature, and the ones
        # it gives inherited arguments replace theirs in its `model_defaults`, which the CLI reads.
        super().__init_subclass__(**kwargs)
        own_init, own_defaults = "__init__" in cls.__dict__, "model_defaults" in cls.__dict__
        if own_init and own_defaults:
            raise TypeError(
                f"{cls.__name__} sets both model_defaults and __init__: give new arguments their defaults in "
                "__init__ and inherited ones there too, or drop __init__ and keep model_defaults"
            )
        if own_defaults:
            cls.__init__ = _init_with_defaults(cls)  # type: ignore[method-assign]
        elif own_init and cls.model_defaults:
            params = inspect.signature(cls.__init__).parameters
            cls.model_defaults = {
                **{k: v for k, v in cls.model_defaults.items() if k not in params},
                **{k: p.default for k, p in params.items() if k in cls.model_defaults and p.default is not p.empty},
            }

    def __init__(
        self,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "linear", "constant", "onecycle", "plateau"] = "cosine",
        warmup: float = 0.0,
        min_lr_ratio: float = 0.0,
        peft: AdapterConfig | None = None,
        scale_lr: Literal["none", "linear", "sqrt"] = "none",
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from peft_lightning.errors import UsageError

        if not lr > 0:
            raise UsageError(f"lr must be > 0, got {lr}: pass e.g. --model.lr 1e-3")
        if weight_decay < 0 or warmup < 0 or not 0 <= min_lr_ratio <= 1:
            raise UsageError("weight_decay and warmup must be >= 0 and min_lr_ratio in [0, 1]")
        self.optimizer_name = optimizer
        self.lr = self.base_lr = lr  # `lr` becomes base_lr x the global-batch factor of `scale_lr` at fit
        self.scale_lr = scale_lr
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.scheduler_name = scheduler
        self.warmup = warmup
        self.min_lr_ratio = min_lr_ratio
        from peft_lightning.adapters import as_config

        self.adapter_config = as_config(peft)  # None when adapters are off
        self._base_fingerprint: str | None = None
        # The fine-tuning contract's state (peft_lightning/contract.py), set by the FineTuning callback (or by hand):
        self.lr_scales = LRScales()  # read live by the LR schedule at every step
        self.schedule_epochs: int | None = None  # schedule length; None: the whole run (retune: one round)
        self.prefix_cache: PrefixCache | None = None  # while FineTuning caches the frozen prefix's output
        self.class_names: list[str] = []  # the head's classes by name: from the data at setup, or the checkpoint

    def prefix_split(self, group: str) -> Split | None:
        """Where the training forward pass can start from cached rows: a ``prefix.Split`` at the input of layer
        group ``group`` (the lowest that trains), or None when the model cannot be cut there. Override per domain
        (``FineTuning`` caches the frozen groups below ``group`` only where this gives a split)."""
        return None

    # --- what each domain supplies ---
    def data_needs(self) -> dict[str, Any]:
        """What this task's data module needs from the model, as the keyword arguments of its ``connect``
        (``data/base.py``): ``{"data_config": ...}`` for images, ``{"tokenizer": ...}`` for text. The CLI hands
        them over after building both; whoever builds a ``Trainer`` by hand calls
        ``data.connect(**model.data_needs())`` before ``fit``. Here: nothing."""
        return {}

    def prediction_rows(self, prediction: Any, batch: Any, top_k: int = 5) -> list[dict[str, Any]]:
        """One row per input of a ``predict`` batch, from what ``predict_step`` returned for it and the batch
        (its ``id`` and, when the data has labels, ``target``): what ``predict`` writes
        (``callbacks/predictions.py``). Override per domain; this default writes each returned tensor's values."""
        columns = {k: v.tolist() if isinstance(v, torch.Tensor) else list(v) for k, v in dict(prediction).items()}
        n = len(next(iter(columns.values()), []))
        return [{k: v[j] for k, v in columns.items()} for j in range(n)]

    def layer_groups(self) -> LayerGroups:
        """Ordered (name, parameter names) pairs from the input side to the head; override per domain."""
        return [("all", [n for n, _ in self.named_parameters()])]

    def adapter_head(self, model: nn.Module) -> list[str]:
        """Module names in the backbone that train in full beside the adapters (the classifier); override."""
        return []

    def fsdp_block_classes(self) -> set[type[nn.Module]]:
        """The model's repeated block classes: FSDP wraps each instance in its own unit, activation checkpointing
        and ``compile`` work per block. Default: found by name (``blocks.N``, ``layer.N`` ..., see
        ``blocks.block_classes``); a domain overrides it when its blocks are named otherwise."""
        from peft_lightning.engine.blocks import block_classes

        return block_classes(self)

    reference_global_batch: ClassVar[int | None] = None
    """The global batch the recipe's ``lr`` was tuned at; None: the recipe's defaults on one device
    (``data_defaults["batch_size"] x trainer_defaults["accumulate_grad_batches"]``)."""

    @classmethod
    def reference_batch(cls) -> int:
        """The global batch ``scale_lr`` scales from (see ``reference_global_batch``)."""
        if cls.reference_global_batch:
            return int(cls.reference_global_batch)
        batch = cls.data_defaults.get("batch_size")
        if not batch:
            from peft_lightning.errors import UsageError

            raise UsageError(
                f"{cls.__name__} has no reference batch for --model.scale_lr: set its "
                "`reference_global_batch` (or data_defaults batch_size), or drop scale_lr"
            )
        return int(batch) * int(cls.trainer_defaults.get("accumulate_grad_batches", 1))

    def configure_model(self) -> None:
        if self.compile_blocks:
            from peft_lightning.engine.compile import compile_modules

            blocks = tuple(self.fsdp_block_classes())
            modules = [m for m in self.modules() if blocks and isinstance(m, blocks)]
            if not modules:
                from peft_lightning.errors import UsageError

                raise UsageError(f"{type(self).__name__} has no blocks to compile: drop --model.compile")
            compile_modules(modules)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether this recipe's data and weights (``assets``) are on this machine now, and a short reason."""
        from peft_lightning.assets import check

        return check(cls.assets)

    # --- adapters (peft): the domain builds its backbone and passes it through `add_adapters` ---
    def add_adapters(self, model: nn.Module, base_name: str | None = None) -> nn.Module:
        """``model`` wrapped with the configured adapters (and ``adapter_head`` trained in full), or unchanged; of
        the domain's ``peft_task_type``."""
        if self.adapter_config is None:
            return model
        from peft_lightning.adapters import wrap

        return wrap(
            model,
            self.adapter_config,
            default_targets=self.default_adapter_targets,
            head=self.adapter_head(model),
            base_name=base_name,
            task_type=self.peft_task_type,
        )

    def trainable_parameter_names(self) -> set[str] | None:
        """Names of the parameters that may ever train: None (all of them) without adapters; with adapters, the
        adapters and the head. The FineTuning callback never unfreezes anything else."""
        from peft_lightning.adapters import trainable_names

        return trainable_names(self) if self.adapter_config is not None else None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training can change: the whole ``state_dict`` without adapters; with them, the trainable
        parameters and every buffer (e.g. BatchNorm statistics), not the frozen base weights."""
        state = self.state_dict()
        keep = self.trainable_parameter_names()
        if keep is None:
            return state
        params = {n for n, _ in self.named_parameters()}
        return {k: v for k, v in state.items() if k in keep or k not in params}

    def _base_weights(self) -> dict[str, torch.Tensor]:
        keep = self.trainable_parameter_names() or set()
        return {n: p for n, p in self.named_parameters() if n not in keep}

    def _base_fingerprint_now(self) -> str:
        from peft_lightning.adapters import fingerprint

        # The head's original copy (peft keeps it beside the trained one) is never used and may be freshly
        # initialised (a new num_classes): it is no part of the base.
        return fingerprint({n: p for n, p in self._base_weights().items() if ".original_module." not in n})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from dataclasses import asdict

        from peft_lightning.rng import rng_states

        checkpoint["rng_states"] = rng_states()
        trainer = internals.attached_trainer(self)
        names = data_spec(trainer.datamodule if trainer is not None else None).class_names
        if names:  # the data's classes in head order: the exported model card (and a reader of predictions) names them
            checkpoint["class_names"] = [str(n) for n in names]
        hp = checkpoint.get("hyper_parameters", {})
        if "peft" in hp:
            # A plain dict loads under torch's weights_only=True. The task's own config, not the saved argument:
            # under the CLI that is jsonargparse's "Unable to serialize instance AdapterConfig(...)" string.
            hp["peft"] = asdict(self.adapter_config) if self.adapter_config is not None else None
        if self.adapter_config is None:
            return
        # The frozen base is not saved: it is re-created from the recipe's pretrained source on load, and the
        # fingerprint proves it is the same base the adapters were trained on.
        if self._base_fingerprint is None:
            self._base_fingerprint = self._base_fingerprint_now()
        keep = set(self.trainable_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adapter_only"] = {"method": self.adapter_config.method, "base_fingerprint": self._base_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from peft_lightning.errors import UsageError

        self._saved_rng = checkpoint.get("rng_states")
        if checkpoint.get("class_names"):  # predict on new data names the classes the model was trained on
            self.class_names = [str(n) for n in checkpoint["class_names"]]
        info = checkpoint.get("adapter_only")
        if info is None:
            return
        if self.adapter_config is None:
            raise UsageError(
                f"the checkpoint holds only {info['method']} adapters and this model has none: pass the "
                f"run's adapter options (--peft.method {info['method']} ..., or -c its config.yaml)"
            )
        base = self._base_weights()
        if self._base_fingerprint is None:
            self._base_fingerprint = self._base_fingerprint_now()
        if self._base_fingerprint != info["base_fingerprint"]:
            raise UsageError(
                "the checkpoint's adapters were trained on other base weights than this recipe builds: "
                "load it with the same model_name, checkpoint_path and pretrained settings"
            )
        # Fill in the frozen base so the strict load sees a whole state_dict.
        checkpoint["state_dict"] = {**{k: v.detach() for k, v in base.items()}, **checkpoint["state_dict"]}

    def on_train_start(self) -> None:
        # A resumed fit continues with the batches it had not trained on yet (data/sampling.py).
        from peft_lightning.internals import resume_loader_position

        resume_loader_position(self.trainer)
        if self.trainer.ckpt_path is None:
            self._saved_rng = None  # loaded for validate/test/predict before a fresh fit: nothing to continue

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # ... and with the random draws (dropout) of the stopped run: its generators as saved, restored right
        # before the first training step, after whatever the resume itself drew (Lightning re-runs a validation
        # that a checkpoint saved at its end; loaders draw seeds).
        rng = self.__dict__.pop("_saved_rng", None)
        if rng is not None:
            from peft_lightning.rng import set_rng_states

            set_rng_states(rng)

    def log_train_loss(self, loss: torch.Tensor, batch_size: int | None = None) -> None:
        """Log ``train/loss`` (and show it on the progress bar) at the steps Lightning writes to the loggers (every
        ``log_every_n_steps``), at each epoch's last step and at the fit's last: the loggers get the rows, and
        ``callback_metrics`` at an epoch's end the value, that logging every step gave; between two, the progress bar
        shows the last value logged. Not every step: a ``LightningModule.log`` call costs ~0.1-0.2 ms on a CPU,
        a tenth of a cached head-only step (``benchmarks/caching.py``)."""
        trainer = self.trainer
        every, step = trainer.log_every_n_steps, trainer.global_step + 1  # Lightning's count: this step's, from 1
        if (
            (every and step % every == 0)
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or trainer.should_stop
            or trainer.fast_dev_run
            or 0 <= trainer.max_steps <= step
        ):
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)

    def configure_optimizers(self) -> Any:
        return optim.configure_optimizers(self)
