"""Precision on every domain (32-true, 16-mixed, bf16-mixed, bf16-true on tiny models, a few steps each, asserting
the dtype inside the forward), the automatic precision decision on mocked hardware, and the launch checks."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from test_recsys import synth, tiny_encoder  # noqa: F401  (fixtures)
from test_text import datamodule, sentiment_csv, tiny_bert  # noqa: F401  (fixtures)
from torch import nn

from peft_lightning.engine import precision
from peft_lightning.engine.launch import check_launch
from peft_lightning.engine.precision import Hardware, auto_precision, cpu_flags, resolve_auto_precision
from peft_lightning.engine.strategy import trainer_overrides
from peft_lightning.errors import UsageError

from helpers import tiny_cli_args

AVX2 = Hardware(cpu_capability="AVX2", cpu_flags=frozenset({"sse4_2", "avx2", "fma"}))
AMX = Hardware(cpu_capability="AVX512", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
ZEN4 = Hardware(cpu_capability="AVX512", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
H100 = Hardware(cuda_devices=8, cuda_bf16=True, cpu_capability="AVX512", cpu_flags=AMX.cpu_flags)
T4 = Hardware(cuda_devices=1, cuda_bf16=False, cpu_capability="AVX2", cpu_flags=AVX2.cpu_flags)
EXPECTED = {
    "32-true": torch.float32,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
}


# --- the automatic precision decision ---
@pytest.mark.parametrize(
    "hardware, accelerator, precision",
    [
        (AVX2, "auto", "32-true"),  # this machine: bf16 is emulated, 3.6-14x slower than fp32
        (AMX, "auto", "bf16-mixed"),
        (ZEN4, "cpu", "bf16-mixed"),
        (H100, "auto", "bf16-mixed"),
        (H100, "gpu", "bf16-mixed"),
        (T4, "auto", "32-true"),  # no native bf16 on compute capability 7.5
        (Hardware(cuda_devices=1, cuda_bf16=True, cpu_flags=AVX2.cpu_flags), "cpu", "32-true"),  # GPU box, CPU run
        (AMX, "mps", "32-true"),
    ],
)
def test_auto_precision_follows_native_bf16_units(hardware, accelerator, precision):
    chosen, why = auto_precision(hardware, accelerator)
    assert chosen == precision and why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse avx2 avx512_bf16 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert {"avx2", "amx_bf16", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert auto_precision(Hardware(cpu_flags=cpu_flags(info)))[0] == "bf16-mixed"


def test_cpu_bf16_0_hides_the_bf16_units_from_auto(monkeypatch, tmp_path):
    # How the suite's time on a CPU without bf16 is measured on any machine.
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    monkeypatch.setattr(precision, "cpu_flags", lambda: cpu_flags(info))
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    monkeypatch.delenv(precision.NO_CPU_BF16, raising=False)
    assert auto_precision(precision.detect_hardware(), "cpu")[0] == "bf16-mixed"
    monkeypatch.setenv(precision.NO_CPU_BF16, "0")
    seen = precision.detect_hardware()
    assert "avx2" in seen.cpu_flags and not seen.cpu_bf16
    assert auto_precision(seen, "cpu")[0] == "32-true"


def test_only_auto_is_resolved_and_the_reason_is_kept():
    defaults = {"precision": "auto", "max_epochs": 1}
    note = resolve_auto_precision(defaults, AMX)
    assert defaults["precision"] == "bf16-mixed" and "amx_bf16" in note
    fixed = {"precision": "32-true"}
    assert resolve_auto_precision(fixed, AMX) is None and fixed["precision"] == "32-true"


@pytest.mark.parametrize(
    "hardware, resolved", [(AVX2, "32-true"), (AMX, "bf16-mixed"), (H100, "bf16-mixed"), (T4, "32-true")]
)
def test_auto_is_shown_as_auto_and_resolved_into_the_run_config(
    cli, monkeypatch, tmp_path, image_folder, hardware, resolved
):
    # --help and --print_config show the recipe's value on every machine (docs/cli.md is generated from --help);
    # the run's config.yaml and summary hold what this machine resolved it to.
    monkeypatch.setattr(precision, "detect_hardware", lambda: hardware)
    code, out, err = cli("fit", "--recipe", "minilm_austen", "--print_config")
    assert code == 0, err[-2000:]
    assert "precision: auto\n" in out
    code, out, _ = cli("fit", "--recipe", "effnet_fashion", "--help")
    assert code == 0 and "default: auto)" in out
    code, out, _ = cli("fit", "--recipe", "minilm_austen", "--trainer.precision", "16-mixed", "--print_config")
    assert code == 0 and "precision: 16-mixed\n" in out
    code, out, _ = cli("fit", "--recipe", "bpr_movielens", "--print_config")  # fp32 by choice: top-k ties in bf16
    assert code == 0 and "precision: 32-true\n" in out
    # A GPU box's answer needs a GPU to run; CPU answers are run: the tiny model trains one step in it.
    accelerator = "cpu" if hardware.cuda_devices == 0 else "gpu"
    if accelerator == "gpu":
        trainer = {"precision": "auto", "accelerator": "auto"}
        resolve_auto_precision(trainer, hardware)
        assert trainer["precision"] == resolved
        return
    code, out, err = cli(
        *tiny_cli_args(
            image_folder,
            tmp_path,
            "--trainer.precision",
            "auto",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--quiet",
        )
    )
    assert code == 0, err[-2000:]
    (config,) = tmp_path.glob("*/*/config.yaml")
    assert f"precision: {resolved}\n" in config.read_text()
    assert resolved in out  # the run summary's precision row


# --- launches that cannot run here stop before any work ---
@pytest.mark.parametrize(
    "trainer, model, environ, match",
    [
        ({"strategy": "fsdp"}, {}, {}, "needs CUDA GPUs"),
        ({"strategy": "fsdp", "accelerator": "gpu"}, {}, {}, "no CUDA GPU"),
        ({"devices": 64}, {}, {}, "cores"),
        ({"devices": "0,1,2", "accelerator": "gpu"}, {}, {}, "no CUDA GPU"),
        ({"num_nodes": 2}, {}, {}, "torchrun --nnodes 2"),
        (
            {"num_nodes": 2, "devices": 1},
            {},
            {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"},
            "torchrun started 4",
        ),
        ({}, {"activation_checkpointing": True}, {}, "through FSDP"),
    ],
)
def test_impossible_launches_stop_with_one_line(monkeypatch, trainer, model, environ, match):
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "LSB_JOBID", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=match):
        check_launch(trainer, model, environ, hardware=AVX2)


def test_possible_launches_pass(monkeypatch):
    check_launch({"strategy": "ddp", "devices": min(2, os.cpu_count() or 1)}, {}, {}, hardware=AVX2)
    check_launch(
        {"strategy": "fsdp", "devices": 8, "num_nodes": 1}, {"activation_checkpointing": True}, {}, hardware=H100
    )
    with pytest.raises(UsageError, match="asks for 9 GPUs but this machine has 8"):
        check_launch({"devices": 9}, {}, {}, hardware=H100)
    check_launch({"num_nodes": 2}, {}, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, hardware=AVX2)


def test_fsdp_on_cpu_stops_before_the_model_is_built(cli, monkeypatch):
    from peft_lightning.tasks.text import TextClassifier

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(TextClassifier, "build_model", never)
    code, _, err = cli("fit", "--recipe", "minilm_austen", "--trainer.strategy", "fsdp")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: --trainer.strategy fsdp needs CUDA GPUs") and "Traceback" not in err


# --- every domain in every precision, autocast visible inside the forward ---
class DtypeProbe:
    """Records the output dtype of a module's forward (a forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.dtypes: list[torch.dtype] = []
        module.register_forward_hook(lambda m, args, out: self.dtypes.append(out.dtype))


def fit_in(precision: str, model, dm, steps: int = 3) -> Trainer:
    # What the CLI does: --trainer.precision 16-mixed on a CPU becomes a float16 MixedPrecision plugin.
    kw = {"precision": precision, **trainer_overrides({"precision": precision, "accelerator": "cpu"}, model)}
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(model, dm)
    return trainer


def check(precision: str, probe: DtypeProbe, trainer: Trainer, model, before: dict[str, torch.Tensor]) -> None:
    assert trainer.precision == precision
    assert probe.dtypes and set(probe.dtypes) == {EXPECTED[precision]}, probe.dtypes
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n].float(), p.float()) for n, p in before.items()), "nothing trained"
    assert all(torch.isfinite(p.float()).all() for p in now.values())
    if precision == "bf16-true":
        assert all(p.dtype == torch.bfloat16 for p in now.values())
    else:  # mixed precision keeps fp32 master weights
        assert all(p.dtype == torch.float32 for p in now.values())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", list(EXPECTED))
def test_vision_trains_in_every_precision(image_folder, precision):
    from helpers import tiny_data, tiny_model

    model = tiny_model(lr=1e-2)
    probe = DtypeProbe(model.model.blocks[0].attn.qkv)
    before = snapshot(model)
    trainer = fit_in(precision, model, tiny_data(image_folder))
    check(precision, probe, trainer, model, before)


@pytest.mark.parametrize("precision", list(EXPECTED))
def test_text_trains_in_every_precision(sentiment_csv, tiny_bert, tmp_path, precision):  # noqa: F811
    from peft_lightning.tasks.text import TextClassifier

    model = TextClassifier(tiny_bert, num_labels=3, lr=1e-2)
    probe = DtypeProbe(model.model.bert.encoder.layer[0].attention.self.query)
    before = snapshot(model)
    trainer = fit_in(precision, model, datamodule(sentiment_csv, tiny_bert, tmp_path))
    check(precision, probe, trainer, model, before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])  # max_steps ends fit before any validation


@pytest.mark.parametrize("precision", list(EXPECTED))
def test_recsys_trains_in_every_precision(synth, tiny_encoder, precision):  # noqa: F811
    from peft_lightning.data.movielens import MovieLensDataModule
    from peft_lightning.tasks.recsys import Recommender

    seed_everything(0)
    model = Recommender("two_tower", num_users=30, num_items=40, text_encoder=tiny_encoder, lr=1e-2)
    probe = DtypeProbe(model.item_text.projection)
    before = snapshot(model)
    dm = MovieLensDataModule(str(synth), val_fraction=0.2, num_negatives=3, batch_size=32)
    trainer = fit_in(precision, model, dm)
    check(precision, probe, trainer, model, before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])  # max_steps ends fit before any validation


def test_16_mixed_on_cpu_scales_the_loss_in_float16():
    plugin = trainer_overrides({"precision": "16-mixed", "accelerator": "cpu"}, None)["plugins"][-1]
    assert plugin.precision == "16-mixed" and plugin.device == "cpu" and plugin.scaler.is_enabled()
    assert trainer_overrides({"precision": "bf16-mixed", "accelerator": "cpu"}, None) == {}
