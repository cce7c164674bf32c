"""``export --onnx``: a LoRA vision run (through the CLI) and a LoRA text model (2-layer BERT) become ``model.onnx``
files whose onnxruntime logits match the PyTorch task's within 1e-4 at two batch sizes (and, for text, two sequence
lengths), loaded and fed as the model card's snippet says; a recommender, or a machine without the ``onnx``
packages, is refused with one line and nothing written; ``import peft_lightning`` and ``export --help`` import no
onnx package."""

from __future__ import annotations

import string
import subprocess
import sys

import numpy as np
import pytest
import torch

from peft_lightning.adapters import AdapterConfig
from peft_lightning.errors import UsageError
from peft_lightning.model_files.export import export
from peft_lightning.model_files.onnx_export import OnnxSpec, write_onnx

from conftest import ROOT, make_image_folder
from helpers import run_card_snippets, save_tiny_bert, tiny_cli_args

TOLERANCE = 1e-4  # fp32: the exporters reorder a few float operations, nothing more
WORDS = ["the", "a", "movie", "was", "good", "bad", "fine"]


def max_abs_diff(session, feeds: dict[str, np.ndarray], expected: torch.Tensor) -> float:
    (logits,) = session.run(["logits"], feeds)
    assert logits.shape == tuple(expected.shape)
    return float(np.abs(logits - expected.numpy()).max())


def test_cli_exports_a_lora_vision_run_whose_onnx_matches_pytorch(tmp_path, cli):
    import timm
    from safetensors.torch import save_file

    from peft_lightning.data.vision import ImageDataModule, open_image
    from peft_lightning.model_files.checkpoints import read_checkpoint
    from peft_lightning.model_files.export import load_task
    from recipes.vit_cifar import VitCifar

    torch.manual_seed(0)
    weights = tmp_path / "base.safetensors"  # a fixed base: the adapter-only checkpoint is rebuilt on it
    save_file(timm.create_model("test_vit", num_classes=3).state_dict(), str(weights))
    images = make_image_folder(tmp_path / "images", classes=3, per_class=6, size=40, splits=True)
    code, _, err = cli(
        *tiny_cli_args(
            images,
            tmp_path / "runs",
            "--model.model_name",
            "test_vit",
            "--model.checkpoint_path",
            str(weights),
            "--data.image_size",
            "160",  # test_vit's own input size (its position embeddings fix it)
            "--peft.method",
            "lora",
            "--peft.r",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--quiet",
        )
    )
    assert code == 0, err[-3000:]
    (run,) = (tmp_path / "runs" / "vit_cifar").iterdir()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "export"
    code, printed, err = cli("export", "--recipe", "vit_cifar", "--ckpt_path", str(best), "--out", str(out), "--onnx")
    assert code == 0, err[-3000:]
    assert str(out / "model.onnx") in printed and not (out / "model.safetensors").exists()  # no --merge
    card = (out / "README.md").read_text()
    for needle in ("- onnx", "dynamo exporter", "`pixel_values` [batch, 3, 160, 160] float32", "[batch, 3]"):
        assert needle in card, f"{needle!r} not in\n{card}"

    # every python block of the card, the onnxruntime one included, runs as written
    snippets = run_card_snippets(out / "README.md")
    session = snippets["session"]
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("pixel_values", ["batch", 3, 160, 160])]
    assert [o.name for o in session.get_outputs()] == ["logits"] and snippets["logits"].shape == (1, 3)

    # real images through the run's own preprocessing (the datamodule the checkpoint recorded, with the task)
    task = load_task(VitCifar, best)
    recorded = read_checkpoint(best)["datamodule_hyper_parameters"]
    data = ImageDataModule(**{k: v for k, v in recorded.items() if not k.startswith("_")})  # not _instantiator
    data.connect(**task.data_needs())  # the model's timm config, as the CLI hands it over
    data.setup("predict")
    pixels = next(iter(data.predict_dataloader()))["pixel_values"]
    raw = data.splits["test"].with_format(None)  # the same images, undecoded: the card's transform on them
    card_pixels = torch.stack([snippets["transform"](open_image(row).convert("RGB")) for row in raw[:2]["image"]])
    assert torch.allclose(card_pixels, pixels[:2], atol=1e-6)  # the card's preprocessing is training's
    diffs = []
    for n in (1, 5):  # two batch sizes: the batch axis is dynamic
        with torch.no_grad():
            expected = task(pixels[:n])
        diffs.append(max_abs_diff(session, {"pixel_values": pixels[:n].numpy()}, expected))
    print("vision max abs diff per batch size 1, 5:", diffs)
    assert max(diffs) <= TOLERANCE, diffs


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BertModel with a WordPiece tokenizer (as tests/test_adapters_text.py builds it)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase]
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), vocab))


def test_text_export_onnx_matches_pytorch_at_two_batch_sizes_and_lengths(tiny_bert, tmp_path):
    from peft_lightning.tasks.text import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier(tiny_bert, num_labels=3, peft=AdapterConfig("lora", r=4)).eval()
    with torch.no_grad():  # LoRA starts as the identity: move the adapters so that merging has something to merge
        for name, p in model.named_parameters():
            if name in model.trainable_parameter_names():
                p.add_(0.05 * torch.randn_like(p))
    written = export(model, tmp_path, merge=True, onnx=True)
    assert {p.name for p in written} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "merged",
        "model.onnx",
        "README.md",
    }
    card = (tmp_path / "README.md").read_text()
    for needle in ("dynamo exporter", "`input_ids` [batch, sequence] int64", "`token_type_ids` [batch, sequence]"):
        assert needle in card, f"{needle!r} not in\n{card}"

    snippets = run_card_snippets(tmp_path / "README.md")  # the peft, merged and onnxruntime snippets
    session, tokenizer = snippets["session"], snippets["tokenizer"]
    names = ["input_ids", "attention_mask", "token_type_ids"]
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(n, ["batch", "sequence"]) for n in names]
    assert snippets["logits"].shape == (2, 3)
    shapes, diffs = [], []
    for texts in (["the movie was good"], ["bad", "the movie was fine but a bit long", "good good movie"]):
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        shapes.append(tuple(encoded["input_ids"].shape))
        with torch.no_grad():
            expected = model(**encoded)
            assert torch.allclose(snippets["merged"].eval()(**encoded).logits, expected, atol=1e-4)  # --merge too
        diffs.append(max_abs_diff(session, {n: encoded[n].numpy() for n in names}, expected))
    assert shapes[0][0] != shapes[1][0] and shapes[0][1] != shapes[1][1], shapes  # both axes took two sizes
    print("text max abs diff per (batch, sequence)", shapes, ":", diffs)
    assert max(diffs) <= TOLERANCE, diffs


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def spec_of(module: torch.nn.Module) -> OnnxSpec:
    return OnnxSpec(module, {"x": torch.ones(2, 3)}, {"x": {0: "batch"}}, "", [], [])


def test_torchscript_exporter_only_where_dynamo_fails_and_one_line_where_both_do(tmp_path, monkeypatch):
    import onnxruntime as ort

    real = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("Could not guard on data-dependent expression\n(40 more lines)")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    written = write_onnx(spec_of(Doubler()), tmp_path / "model.onnx")
    assert written.exporter == "torchscript" and written.outputs == 3
    session = ort.InferenceSession(str(written.path))
    assert np.array_equal(session.run(["logits"], {"x": np.ones((5, 3), np.float32)})[0], np.full((5, 3), 2.0))

    def both_fail(*args, **kwargs):
        raise RuntimeError("Unsupported: aten::weird_op\n(40 more lines)")

    monkeypatch.setattr(torch.onnx, "export", both_fail)
    with pytest.raises(UsageError, match="cannot export Doubler to ONNX.*weird_op.*without --onnx") as err:
        write_onnx(spec_of(Doubler()), tmp_path / "other.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "other.onnx").exists()


def test_recsys_export_onnx_refuses_with_one_line(tmp_path, cli):
    import lightning

    from recipes.bpr_movielens import BprMovielens

    model = BprMovielens(num_users=5, num_items=7, dim=4)
    ckpt = tmp_path / "mf.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    out = tmp_path / "export"
    args = ["export", "--recipe", "bpr_movielens", "--ckpt_path", str(ckpt), "--out", str(out)]
    code, _, err = cli(*args, "--merge", "--onnx")
    assert code == 2 and "cannot be exported to ONNX" in err and "without --onnx" in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not out.exists()  # refused before anything was written
    assert cli(*args, "--merge")[0] == 0  # the same checkpoint exports without --onnx


def test_missing_onnx_packages_stop_with_one_line_before_writing(tmp_path, monkeypatch):
    from peft_lightning.tasks.vision import ImageClassifier

    model = ImageClassifier("test_vit", num_classes=3, pretrained=False).eval()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` sees where it is not installed
    with pytest.raises(UsageError, match=r"needs onnxscript.*pip install 'peft_lightning\[onnx\]'") as err:
        export(model, tmp_path / "export", onnx=True)
    assert "\n" not in str(err.value) and not (tmp_path / "export").exists()


def test_import_and_export_help_import_no_onnx_package():
    code = (
        "import sys, runpy; sys.argv=['peft_lightning','export','--help']; import peft_lightning\n"
        "try: runpy.run_module('peft_lightning', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print('ONNX', [m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--onnx" in out and "ONNX []" in out
