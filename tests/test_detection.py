"""Object detection: the task and data module on a tiny timm backbone and synthetic scenes (COCO files and a
``datasets`` table in the hub's layout), through the CLI as a user runs it: fit, predict, export and its card,
the strategies and the prefix cache, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from peft_lightning.callbacks.finetuning import FineTuning
from peft_lightning.callbacks.strategies import Full, Head
from peft_lightning.data.detection import DetectionDataModule, checked_box
from peft_lightning.data.scenes import write_scenes
from peft_lightning.errors import UsageError
from peft_lightning.tasks.detection import DetectionTask

NAMES = ["square", "ring", "bar"]
TINY = {"num_classes": 3, "pretrained": False, "image_size": 64, "fpn_channels": 32, "head_convs": 1}
TINY_FLAGS = [
    "--model.model_name=test_efficientnet",
    "--model.pretrained=false",
    "--model.num_classes=3",
    "--model.image_size=64",
    "--model.fpn_channels=32",
    "--model.head_convs=1",
    "--model.extra_levels=false",
    "--data.num_workers=0",
    "--data.batch_size=8",
    "--trainer.precision=32-true",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


def shapes() -> tuple[np.ndarray, np.ndarray]:
    """Three kinds of 16 px item: a filled square, a ring, a bar; 30 of each, of varying brightness."""
    items, labels = [], []
    for kind in range(3):
        for i in range(30):
            item = np.zeros((16, 16), np.uint8)
            value = 150 + 3 * i
            if kind == 0:
                item[2:14, 2:14] = value
            elif kind == 1:
                item[2:14, 2:14] = value
                item[5:11, 5:11] = 0
            else:
                item[6:10, 1:15] = value
            items.append(item)
            labels.append(kind)
    return np.stack(items), np.array(labels)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """COCO files of 64 px scenes: train.json (48), validation.json (12), test.json (12), images/ beside them."""
    folder = tmp_path_factory.mktemp("scenes")
    items, labels = shapes()
    for i, (split, count) in enumerate((("train", 48), ("validation", 12), ("test", 12))):
        write_scenes(folder, split, items, labels, NAMES, count, canvas=64, items=(1, 3), sizes=(14, 30), seed=i)
    return folder


@pytest.fixture(scope="module")
def hub_table(coco, tmp_path_factory) -> Path:
    """The same scenes as a ``save_to_disk`` folder laid out as CPPE-5 is on the hub (``image``, ``width``,
    ``height``, ``objects: {id, area, bbox (xywh), category (ClassLabel)}``); train and test splits."""
    import datasets

    folder = tmp_path_factory.mktemp("hub") / "cppe5_like"
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "id": datasets.List(datasets.Value("int64")),
                "area": datasets.List(datasets.Value("int64")),
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=NAMES)),
            },
        }
    )
    splits = {}
    for split, source in (("train", "train"), ("test", "test")):
        data = json.loads((coco / f"{source}.json").read_text())
        rows = {k: [] for k in features}
        for im in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            rows["image"].append(str(coco / im["file_name"]))
            rows["width"].append(im["width"])
            rows["height"].append(im["height"])
            rows["objects"].append(
                {
                    "id": [a["id"] for a in anns],
                    "area": [a["area"] for a in anns],
                    "bbox": [a["bbox"] for a in anns],
                    "category": [a["category_id"] for a in anns],
                }
            )
        splits[split] = datasets.Dataset.from_dict(rows, features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def tiny_data(source: Path, model: DetectionTask, **kw) -> DetectionDataModule:
    data = DetectionDataModule(str(source), **{"batch_size": 8, "num_workers": 0, "hflip": 0.0, "seed": 0, **kw})
    data.connect(**model.data_needs())
    return data


def fit(source: Path, strategy, epochs: int = 2, data_kw=None, **model_kw) -> tuple[DetectionTask, Trainer]:
    seed_everything(0)
    model = DetectionTask("test_efficientnet", **{**TINY, "extra_levels": False, "lr": 5e-3, **model_kw})
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[strategy if isinstance(strategy, FineTuning) else FineTuning(strategy)],
    )
    trainer.fit(model, tiny_data(source, model, **(data_kw or {})))
    return model, trainer


def test_coco_files_give_letterboxed_images_and_scaled_xyxy_boxes(coco):
    model = DetectionTask("test_efficientnet", **{**TINY, "image_size": 32})
    data = tiny_data(coco, model)
    data.setup("fit")
    assert data.class_names == NAMES and data.spec().sizes == {"num_classes": 3}
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    raw = json.loads((coco / "train.json").read_text())
    # every box comes back at half the scale (64 px scenes -> 32 px input), as x1, y1, x2, y2
    by_image = {}
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x / 2, y / 2, (x + w) / 2, (y + h) / 2])
    for i, boxes in zip(batch["index"].tolist(), batch["boxes"]):
        assert torch.allclose(boxes, torch.tensor(by_image[i]))
    assert len(data.splits["validation"]) == 12 and len(data.splits["test"]) == 12


def test_layer_groups_cover_the_backbone_neck_and_head_once():
    model = DetectionTask("test_efficientnet", **TINY)
    names = [n for n, _ in model.layer_groups()]
    assert names[0] == "stem" and names[-2:] == ["neck", "head"] and "blocks.4" in names
    grouped = [p for _, ps in model.layer_groups() for p in ps]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    assert model.fresh_modules() == ["model.backbone.fpn", "model.head", "model.backbone.body"]


def test_box_checks():
    assert checked_box([1, 2, 3, 4], "xywh", 10, 10, False, "a") == [1, 2, 4, 6]
    assert checked_box([1, 2, 3, 4], "xyxy", 10, 10, False, "a") == [1, 2, 3, 4]
    assert checked_box([-0.5, 0, 10.5, 10], "xyxy", 10, 10, False, "a") == [0, 0, 10, 10]  # within 1 px: clipped
    with pytest.raises(UsageError, match="outside its 10x10 image"):
        checked_box([5, 5, 8, 8], "xywh", 10, 10, False, "a")
    assert checked_box([5, 5, 8, 8], "xywh", 10, 10, True, "a") == [5, 5, 10, 10]
    with pytest.raises(UsageError, match="no area"):
        checked_box([5, 5, 3, 8], "xyxy", 10, 10, False, "a")


def test_a_frozen_backbone_pyramid_is_cached_and_trains_as_uncached(coco):
    """Head(groups=2) trains the neck and the head: the backbone's feature levels are computed once per image and
    the cached run ends with the uncached run's weights; the backbone never changes."""
    cached, trainer = fit(coco, FineTuning(Head(groups=2), cache_features=True), epochs=2)
    plain, _ = fit(coco, FineTuning(Head(groups=2), cache_features=False), epochs=2)
    notes = " ".join(trainer.callbacks[0].cache_summary(cached))
    assert "input of neck: 48/48 examples" in notes and "50% of training examples served from it" in notes, notes
    seed_everything(0)
    start = DetectionTask("test_efficientnet", **{**TINY, "extra_levels": False})
    before, after, other = start.state_dict(), cached.state_dict(), plain.state_dict()
    for name in after:
        assert torch.allclose(after[name].float(), other[name].float(), atol=1e-5), name
    body = [n for n in after if ".body." in n and n.endswith("weight")]
    assert all(torch.equal(before[n], after[n]) for n in body)
    assert not torch.equal(
        before["model.head.classification_head.cls_logits.weight"],
        after["model.head.classification_head.cls_logits.weight"],
    )


def test_full_training_with_lr_decay_trains_every_group_at_its_scale(coco):
    seed_everything(0)
    start = DetectionTask("test_efficientnet", **{**TINY, "extra_levels": False}).state_dict()
    model, trainer = fit(coco, FineTuning(Full(), lr_decay=0.5), epochs=1, lr=1e-2)
    assert {"val/map", "val/map_50", "val/map_75", "val/loss", "train/loss"} <= set(trainer.callback_metrics)
    after = model.state_dict()
    for group, names in model.layer_groups():
        assert any(not torch.equal(start[n], after[n]) for n in names), group
    scales = model.lr_scales.layer
    assert scales["stem"] < scales["blocks.4"] < scales["neck"] < scales["head"] == 1.0


def test_auto_picks_groups_and_runs(coco):
    model, trainer = fit(coco, FineTuning("auto"), epochs=2)
    chosen = trainer.callbacks[0].trainable_groups
    assert chosen and "head" in chosen and "val/map" in trainer.callback_metrics


# --- the CLI: the hub recipe on a local table in its layout, LoRA, predict, export and its card ---
@pytest.fixture(scope="module")
def lora_run(hub_table, tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    from peft_lightning.cli import main

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    weights = root / "backbone.safetensors"  # a fixed base: the adapters are only valid on it
    save_file(timm.create_model("test_efficientnet").state_dict(), str(weights))
    args = [
        "fit",
        "--recipe",
        "fcos_cppe5",
        *TINY_FLAGS,
        f"--model.checkpoint_path={weights}",
        f"--data.dataset={hub_table}",
        "--data.val_fraction=0.2",
        "--peft.method=lora",
        "--peft.r=4",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={root}",
        "--quiet",
    ]
    try:
        main(args)
    except SystemExit as exit_:
        assert not exit_.code, exit_
    (run,) = (root / "fcos_cppe5").iterdir()
    return run, weights


def test_cli_fit_with_lora_predict_and_export_card(lora_run, coco, tmp_path, cli):
    from peft_lightning.model_files.export import load_task
    from recipes.fcos_cppe5 import FcosCppe5

    from helpers import run_card_snippets

    run, weights = lora_run
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    flags = [*TINY_FLAGS, f"--model.checkpoint_path={weights}", "--peft.method=lora", "--peft.r=4"]
    predict = [f"--ckpt_path={best}", f"--data.predict_data={coco / 'test.json'}", f"--predictions.out={tmp_path}"]
    code, out, err = cli("predict", "--recipe", "fcos_cppe5", *flags, *predict)
    assert code == 0, err
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    assert len(rows) == 12 and rows[0]["id"].endswith("00000.png")
    assert set(rows[0]) >= {"boxes", "labels", "scores", "true_boxes", "true_labels"}
    truth = json.loads((coco / "test.json").read_text())
    first = [a["bbox"] for a in truth["annotations"] if a["image_id"] == 0]
    assert rows[0]["true_boxes"] == [[x, y, x + w, y + h] for x, y, w, h in first]  # original pixels, xyxy
    assert all(set(r["labels"]) <= set(NAMES) for r in rows)

    export = tmp_path / "export"
    code, _, err = cli("export", "--recipe", "fcos_cppe5", "--ckpt_path", str(best), "--out", str(export), "--merge")
    assert code == 0, err
    card = (export / "README.md").read_text()
    assert "LoRA" in card and "--model.init_from" in card
    snippets = run_card_snippets(export / "README.md")
    task = load_task(FcosCppe5, best)
    image = torch.rand(3, 48, 64)
    with torch.no_grad():
        want = task.model.eval()([image])[0]
        for name in ("model", "merged"):
            got = snippets[name].eval()([image])[0]
            assert torch.allclose(got["scores"], want["scores"], atol=1e-4), name
            assert torch.allclose(got["boxes"], want["boxes"], atol=1e-2), name


@pytest.mark.parametrize(
    "case, match",
    [
        ("outside", "lies outside its 64x64 image"),
        ("empty", "empty annotation file"),
        ("category", "category id 7, which its `categories` do not list"),
        ("missing", "is missing"),
    ],
)
def test_bad_annotations_stop_with_one_line(coco, tmp_path, cli, case, match):
    folder = tmp_path / "bad"
    shutil.copytree(coco, folder)
    data = json.loads((folder / "train.json").read_text())
    if case == "outside":
        data["annotations"][3]["bbox"] = [50, 50, 30, 30]
    elif case == "empty":
        data = {"images": [], "annotations": [], "categories": data["categories"]}
    elif case == "category":
        data["annotations"][3]["category_id"] = 7
    else:
        (folder / data["images"][5]["file_name"]).unlink()
    (folder / "train.json").write_text(json.dumps(data))
    code, _, err = cli("fit", "--recipe", "fcos_fashion_scenes", *TINY_FLAGS, f"--data.dataset={folder}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and match in lines[0], err


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_to_the_uninterrupted_run(coco, tmp_path):
    """SIGKILL in the middle of step 8 (epoch 1 of 2, the frozen backbone's pyramid cached), then ``--ckpt_path
    last``: the same weights and validation metrics as a run never stopped."""
    import signal

    from test_reliability import assert_same_run, kill_args

    from helpers import forked_cli

    def args(root: Path, *extra: str) -> list[str]:
        return [
            "fit",
            "--recipe",
            "fcos_fashion_scenes",
            *TINY_FLAGS,
            f"--data.dataset={coco}",
            "--trainer.max_epochs=2",
            "--trainer.deterministic=true",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={root}",
            "--checkpoint.last_every_n_train_steps=3",
            "--trainer.callbacks+=reliability_callbacks.RecordMetrics",
            f"--trainer.callbacks.path={root / 'metrics.jsonl'}",
            *extra,
        ]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert forked_cli(args(whole)).returncode == 0
    res = forked_cli(args(killed, *kill_args(8)))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    res = forked_cli(args(killed, "--ckpt_path", "last"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(whole, killed, "SIGKILL at step 8")
