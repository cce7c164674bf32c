"""A tracker the user adds with ``--trainer.logger`` (MLflow, W&B) logs beside the run folder's own loggers, not
instead: the tracker gets the hyper-parameters, the whole config (params and config.yaml), the metrics and the best
checkpoint, and the run folder keeps metrics.csv, curves.png and the summary. Real fits of a tiny random
EfficientNet, on a local MLflow store and an offline W&B run (no network)."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import pytest
import yaml

import peft_lightning
from peft_lightning.cli import main

from helpers import tiny_cli_args

# Two optimizer steps and one validation batch: what is tested is where things are logged, not the training.
BUDGET = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
BUDGET += ["--trainer.log_every_n_steps", "1", "--quiet"]


def fit(images: Path, root: Path, *extra: str) -> str:
    """The tiny ``fit`` in this process; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([*tiny_cli_args(images, root), *BUDGET, *extra])
    return out.getvalue()


def run_folder(root: Path) -> Path:
    (folder,) = (root / "vit_cifar").iterdir()
    return folder


def assert_run_folder_complete(folder: Path, printed: str) -> None:
    """Ours as without a tracker: metrics.csv with the training loss, curves, checkpoints and the summary."""
    assert "train/loss" in (folder / "metrics.csv").read_text().splitlines()[0]
    assert (folder / "curves.png").is_file() and (folder / "config.yaml").is_file()
    assert list((folder / "checkpoints").glob("best-*.ckpt"))
    assert "run summary" in printed and str(folder) in printed


def mlflow_flags(tmp_path: Path) -> list[str]:
    # SQLite, the store MLflow 3.18 asks for (it refuses a `file:` store unless MLFLOW_ALLOW_FILE_STORE is set).
    return [
        "--trainer.logger",
        "MLFlowLogger",
        "--trainer.logger.init_args.tracking_uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--trainer.logger.init_args.artifact_location",
        str(tmp_path / "mlartifacts"),
        "--trainer.logger.init_args.experiment_name",
        "trackers",
    ]


def test_mlflow_gets_params_config_metrics_and_the_best_checkpoint_and_the_run_folder_stays(image_folder, tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "runs"
    extra = ["--trainer.logger.init_args.log_model", "true", "--test_after_fit", "true"]
    printed = fit(image_folder, root, *mlflow_flags(tmp_path), *extra)
    folder = run_folder(root)
    assert_run_folder_complete(folder, printed)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trackers").experiment_id])
    params, metrics = run.data.params, run.data.metrics
    # The task's hyper-parameters (Lightning's), the whole config under config/, where the run's files are.
    assert params["model_name"] == "test_efficientnet"
    assert params["config/trainer/max_epochs"] == "1" and params["config/finetuning/strategy"]
    assert params["run_folder"] == str(folder)
    best = Path(params["best_checkpoint"])
    assert best.is_file() and best.parent == folder / "checkpoints"
    assert {"train/loss", "val/acc", "finetune/groups", "test/acc"} <= set(metrics)  # test: after fit
    [loss] = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")][-1:]
    assert loss == pytest.approx(float(_last(folder / "metrics.csv", "train/loss")), rel=1e-5)
    # config.yaml as an artifact (the file that reruns it), and the checkpoints (log_model: true).
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(local.read_text()) == yaml.safe_load((folder / "config.yaml").read_text())
    uploaded = [a.path for a in client.list_artifacts(run.info.run_id, best.stem)]
    assert f"{best.stem}/{best.name}" in uploaded  # Lightning's MLFlowLogger: a folder per checkpoint


def test_wandb_offline_gets_config_metrics_and_the_best_checkpoint_from_a_yaml_list(
    image_folder, tmp_path, monkeypatch
):
    import wandb

    # Offline; and were anything to try a server anyway, it would find none at this local port.
    offline = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    for key, value in {**offline, "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # A list in a -c file: the form a team keeps in its run config.
    config = tmp_path / "trackers.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": [
                        {
                            "class_path": "lightning.pytorch.loggers.WandbLogger",
                            "init_args": {"project": "vit_cifar", "offline": True, "save_dir": str(tmp_path)},
                        }
                    ]
                }
            }
        )
    )
    root = tmp_path / "runs"
    try:
        printed = fit(image_folder, root, "-c", str(config))
    finally:
        # The CLI's process does this at exit. wandb.finish() alone returns before W&B's service has written the
        # run's records (wandb 0.31 offline); teardown waits for it.
        wandb.finish()
        wandb.teardown()
    folder = run_folder(root)
    assert_run_folder_complete(folder, printed)

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    config_sent, history, files = {}, [], []
    for record in _wandb_records(next(run.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config_sent.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "files":
            files += [f.path for f in record.files.files]
    assert config_sent["model_name"] == "test_efficientnet"
    assert config_sent["config"]["trainer"]["max_epochs"] == 1
    assert config_sent["run_folder"] == str(folder)
    assert Path(config_sent["best_checkpoint"]).is_file()
    logged = {key for row in history for key in row}
    assert {"train/loss", "val/acc", "finetune/groups"} <= logged
    loss = [row["train/loss"] for row in history if "train/loss" in row][-1]
    assert loss == pytest.approx(float(_last(folder / "metrics.csv", "train/loss")), rel=1e-5)
    assert f"{folder.name}/config.yaml" in files  # beside W&B's own config.yaml, not over it


def test_logger_false_writes_no_metrics_but_keeps_the_checkpoints(image_folder, tmp_path):
    fit(image_folder, tmp_path, "--trainer.logger", "false")
    folder = run_folder(tmp_path)
    assert not (folder / "metrics.csv").exists() and not (folder / "tensorboard").exists()
    assert list((folder / "checkpoints").glob("best-*.ckpt")) and (folder / "checkpoints" / "last.ckpt").is_file()


def test_a_tune_trial_with_a_tracker_keeps_its_own_folder_and_metrics(image_folder, tmp_path):
    from mlflow import MlflowClient

    flags = [*tiny_cli_args(image_folder, tmp_path / "runs")[1:], *BUDGET, *mlflow_flags(tmp_path)]
    space = {"model.lr": {"type": "float", "low": 1e-3, "high": 1e-2}, "model.weight_decay": None, "model.warmup": None}
    study = peft_lightning.tune("vit_cifar", 1, study="t", args=flags, plots=False, space=space)
    (trial,) = study.trials
    folder = Path(trial.user_attrs["run_dir"])
    assert folder.name == "trial-000" and "val/acc" in (folder / "metrics.csv").read_text().splitlines()[0]
    assert trial.value is not None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trackers").experiment_id])
    assert run.data.params["run_folder"] == str(folder)


def test_a_tracker_that_refuses_costs_a_warning_not_the_run(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    from peft_lightning.callbacks.trackers import Trackers

    class Refusing(CSVLogger):
        def log_hyperparams(self, params, *args, **kwargs):
            raise ConnectionError("server down")

    (tmp_path / "config.yaml").write_text("trainer: {max_epochs: 1}\n")
    checkpoint = SimpleNamespace(best_model_path=str(tmp_path / "best.ckpt"))
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[], default_root_dir=str(tmp_path), checkpoint_callback=checkpoint
    )
    trackers = Trackers([Refusing(tmp_path)])
    with pytest.warns(UserWarning, match=r"could not send the run's config to Refusing \(ConnectionError: server down"):
        trackers.on_fit_start(trainer, None)
    with pytest.warns(UserWarning, match="could not send the best checkpoint's path to Refusing"):
        trackers.on_fit_end(trainer, None)


def _last(metrics_csv: Path, column: str) -> str:
    import csv

    return [row[column] for row in csv.DictReader(metrics_csv.open()) if row.get(column)][-1]


def _wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (W&B's protobuf ``Record``s in LevelDB's log format: 32 KiB
    blocks of chunks, each with a 7-byte header: CRC, length, type; the file starts with ``:W&B``, magic, version).
    wandb 0.31 ships no reader for it; ``wandb sync`` is what reads it, and it needs the network."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled tail
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or the LAST chunk of a record split across blocks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record
