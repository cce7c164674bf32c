"""``tune``: hyperparameter and layer search with Optuna, each trial a real ``fit``; resumable, on one machine or many.

    python -m peft_lightning tune --recipe effnet_fashion --n_trials 20 --data.max_train_samples 6000
    python -m peft_lightning tune --recipe minilm_austen --space space.yaml --storage journal:///shared/austen.log

- **Trials** run in this process through the ``fit`` command's own LightningCLI class
  (``cli.lightning_cli.PeftLightningCLI``), so every ``fit`` flag applies to every trial, with the sampled values as
  more flags and ``--test_after_fit false`` (the search never sees the test set). The score is the recipe's ``monitor`` (``monitor_mode``): its best value
  over the trial's validations. Each trial writes its own run folder, ``<root>/<recipe>/tune-<study>/trial-NNN``.
  In-process, not a process per trial: no interpreter and import start (seconds) per trial, and a failing trial is
  an exception to record, not an exit code to decode. Lightning's state is per Trainer, and the CLI seeds every
  trial (``seed_everything``), so trials do not leak into each other.
- **Search space**: the recipe's ``search_space`` (``FineTuneTask.search_space``), overridden or extended by a YAML
  file of Optuna distributions (``load_space``); checked against the ``fit`` parser before any trial runs.
- **Pruning**: ``optuna_integration.PyTorchLightningPruningCallback`` (it imports ``lightning.pytorch``, the unified
  package this project uses) reports the monitored metric at every validation and stops a trial the pruner
  (median, Hyperband) rejects. A trial that raises (a non-finite loss, out of memory, a sampled combination the
  recipe refuses) is recorded as failed with its reason (user attribute ``reason``) and the study goes on.
- **Storage**: a SQLite file in the study folder unless ``--storage`` names another (an RDB URL, or
  ``journal://PATH`` for Optuna's journal file); ``load_if_exists`` makes the same command resume, and several
  ``tune`` processes on one storage share the study (Optuna's distributed optimisation).
- **Results**: a table of the trials after each one and at the end, ``best.yaml`` (the best trial's ``config.yaml``
  for ``fit -c best.yaml``), ``history.png`` and ``importance.png`` (``optuna.visualization.matplotlib``).

Modules: ``space`` (the search space), ``study`` (storage, pruner, lost trials, results), ``trial`` (the ``fit``
command, checked once and run per trial), ``search`` (the study's run and the command). Optuna is imported inside
the functions: ``python -m peft_lightning --help`` and ``list`` never load it.
"""

from peft_lightning.tuning.search import tune, tune_command
from peft_lightning.tuning.space import load_space
from peft_lightning.tuning.study import counted, make_pruner, make_storage, write_best

__all__ = ["counted", "load_space", "make_pruner", "make_storage", "tune", "tune_command", "write_best"]
