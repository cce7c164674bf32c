"""The vision task and data module on a tiny timm model and synthetic images."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from peft_lightning.data.vision import ImageDataModule, open_image
from peft_lightning.errors import UsageError
from peft_lightning.tasks.optim import param_groups
from peft_lightning.tasks.vision import ImageClassifier, load_state_dict


def tiny(num_classes: int = 3, **kw) -> ImageClassifier:
    return ImageClassifier("test_vit", num_classes=num_classes, pretrained=False, **kw)


def test_head_reset_and_named_layer_groups():
    model = tiny(num_classes=7)
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 7)
    names = [n for n, _ in model.layer_groups()]
    assert names[0] == "stem" and names[-1] == "head" and names[1:-1] == [f"blocks.{i}" for i in range(6)]
    grouped = [p for _, ps in model.layer_groups() for p in ps]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # every parameter, once


def test_param_groups_are_named_and_skip_decay_on_1d():
    model = tiny()
    model.lr_scales.layer = {"stem": 0.1}
    groups = list(param_groups(model))
    by_name = {g["name"]: g for g in groups}
    assert by_name["stem"]["lr"] == pytest.approx(model.lr * 0.1)
    assert by_name["head.no_wd"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] > 0
    assert all(p.ndim <= 1 for p in by_name["head.no_wd"]["params"])


def test_checkpoint_path_loads_backbone_and_resets_head(tmp_path):
    source = ImageClassifier("test_vit", num_classes=5, pretrained=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(source.model.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        model = tiny(num_classes=3, checkpoint_path=str(tmp_path / f))
        assert torch.equal(model.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)
        assert model.model.head.weight.shape[0] == 3


def test_bad_weights_files_stop_with_a_clear_message(tmp_path):
    (tmp_path / "trunc.pth").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        load_state_dict(tmp_path / "trunc.pth")
    with pytest.raises(UsageError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")
    other = ImageClassifier("resnet10t", num_classes=3, pretrained=False)
    torch.save(other.model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UsageError, match="another architecture"):
        tiny(checkpoint_path=str(tmp_path / "resnet.pth"))


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UsageError):
        load_state_dict(tmp_path / "evil.pth")


def test_offline_pretrained_names_the_flags_to_use():
    with pytest.raises(UsageError, match="checkpoint_path"):
        ImageClassifier("vit_base_patch16_224.augreg_in21k", num_classes=10, pretrained=True)


def test_unknown_model_name():
    with pytest.raises(UsageError, match="unknown timm model"):
        ImageClassifier("vit_nonexistent_xyz", pretrained=False)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        tiny(lr=-1.0)
    with pytest.raises(UsageError, match="batch_size"):
        ImageDataModule("x", batch_size=0)


def test_image_folder_splits_transforms_and_grey_images(image_folder):
    dm = ImageDataModule(str(image_folder), image_size=48, batch_size=4, num_workers=0, val_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 3 and dm.class_names == ["class_0", "class_1", "class_2"]
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 22, "validation": 6, "test": 8}  # 36 images: 20% to test, then 20% of the rest to val
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and batch["labels"].shape == (4,)

    again = ImageDataModule(str(image_folder), image_size=48, num_workers=0, val_fraction=0.2)
    again.setup()
    assert again.splits["validation"].with_format(None)["label"] == dm.splits["validation"].with_format(None)["label"]


def test_carved_splits_are_disjoint(image_folder):
    dm = ImageDataModule(str(image_folder), image_size=32, num_workers=0, val_fraction=0.2)
    dm.setup()
    paths = {}
    for split, d in dm.splits.items():
        d = d.with_format(None)
        paths[split] = {open_image(cell).tobytes() for cell in d["image"]}  # cells are read lazily, as files
    assert not paths["train"] & paths["validation"] and not paths["train"] & paths["test"]
    assert not paths["validation"] & paths["test"]


def test_num_classes_mismatch_is_reported(image_folder):
    model = tiny(num_classes=5)
    dm = ImageDataModule(str(image_folder), image_size=160, batch_size=4, num_workers=0)
    dm.connect(**model.data_needs())
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UsageError, match="--model.num_classes 3"):
        trainer.fit(model, dm)


def test_one_training_step_changes_weights_and_logs_metrics(image_folder):
    model = tiny(lr=1e-2)
    dm = ImageDataModule(str(image_folder), batch_size=8, num_workers=0)
    dm.connect(**model.data_needs())
    before = model.model.head.weight.detach().clone()
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, dm)
    assert not torch.equal(before, model.model.head.weight)
    assert {"val/acc", "val/f1", "val/loss"} <= set(trainer.callback_metrics)
    assert dm.data_config["input_size"] == (3, 160, 160)  # taken from the model being tuned


def test_missing_dataset_path_and_missing_column(tmp_path, image_folder):
    with pytest.raises(UsageError, match="does not exist"):
        ImageDataModule(str(tmp_path / "nowhere"), num_workers=0).setup()
    with pytest.raises(UsageError, match="no label column"):
        ImageDataModule(str(image_folder), label_column="target", num_workers=0).setup()


# --- one parquet file (data/source.py) ---
def image_rows(n: int = 12, size: int = 32) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return {
        "image": [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)],
        "label": [0, 1, 2] * (n // 3),
    }


@pytest.fixture
def parquet_file(tmp_path):
    """``train.parquet`` as ``datasets`` writes it: an ``image`` column and a ``label`` column."""
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(image_rows()).cast_column("image", datasets.Image()).to_parquet(str(path))
    return path


def test_one_parquet_file_by_absolute_and_relative_path(parquet_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (str(parquet_file), "./train.parquet", "train.parquet"):
        dm = ImageDataModule(
            name, image_size=32, batch_size=4, num_workers=0, val_fraction=0.2, cache_dir=str(tmp_path / "cache")
        )
        dm.setup()
        assert {k: len(v) for k, v in dm.splits.items()} == {"train": 7, "validation": 2, "test": 3}, name
        assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 3, 32, 32)


def test_parquet_written_by_other_tools_holds_images_as_bytes_and_path(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = image_rows()
    cells = []
    for image in rows["image"]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"picture": cells, "label": rows["label"]}), tmp_path / "other.parquet")
    dm = ImageDataModule(
        str(tmp_path / "other.parquet"),
        image_size=32,
        batch_size=4,
        num_workers=0,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 3, 32, 32)


def test_a_column_of_pixel_lists_names_the_columns_and_the_image_column_needed(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"pixels": [[0] * 784] * 6, "label": [0, 1, 2] * 2}).to_parquet(
        str(tmp_path / "pixels.parquet")
    )
    for column in (None, "pixels"):
        dm = ImageDataModule(
            str(tmp_path / "pixels.parquet"), image_column=column, num_workers=0, cache_dir=str(tmp_path / "cache")
        )
        with pytest.raises(UsageError) as err:
            dm.setup()
        message = str(err.value)
        assert "\n" not in message and "--data.image_column NAME" in message
        assert "columns: pixels (list of int64), label (int64); an image column holds images" in message


def test_cli_fits_on_one_parquet_file_given_by_a_relative_path(parquet_file, tmp_path, monkeypatch, cli):
    from helpers import tiny_cli_args

    monkeypatch.chdir(tmp_path)
    code, _, err = cli(
        *tiny_cli_args(
            "./train.parquet",
            tmp_path / "runs",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--data.cache_dir",
            str(tmp_path / "cache"),
        )
    )
    assert code == 0, err[-3000:]
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_checkpoint_with_a_head_of_the_right_size_keeps_it(tmp_path):
    """timm loads the file (pretrained_cfg_overlay) strictly; a fine-tuned head of num_classes is kept, not reset."""
    source = tiny(num_classes=3)
    torch.save(source.model.state_dict(), tmp_path / "tuned.pth")
    model = tiny(num_classes=3, checkpoint_path=str(tmp_path / "tuned.pth"))
    assert all(torch.equal(v, source.model.state_dict()[k]) for k, v in model.model.state_dict().items())


def test_data_spec_declares_the_classes(image_folder):
    from peft_lightning.data.checks import DataSpec, check_sizes, data_spec

    dm = ImageDataModule(str(image_folder), num_workers=0)
    assert data_spec(dm) == DataSpec()  # nothing before setup
    dm.setup()
    spec = data_spec(dm)
    assert spec.sizes == {"num_classes": 3} and spec.class_names == ["class_0", "class_1", "class_2"]
    assert data_spec(None) == DataSpec() and data_spec(object()) == DataSpec()  # foreign data declares nothing
    with pytest.raises(
        UsageError, match="the data has 3 classes but the model was built for 5: pass --model.num_classes 3"
    ):
        check_sizes(spec, num_classes=5)
