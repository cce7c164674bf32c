"""The benchmarks runner: figures are well formed (never a timing threshold), the helpers compute what they say."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import ratio_summary, throughput
from benchmarks.quality import parse


def test_throughput_counts_whole_steps_after_warmup():
    starts = [0.0, 5.0, 6.0, 7.5, 8.0]  # 4 whole steps: 5 s (warm-up), 1 s, 1.5 s, 0.5 s
    out = throughput(starts, 16, warmup=1)
    assert out["steps"] == 3
    assert out["samples_per_s"] == pytest.approx(3 * 16 / 3.0)
    assert out["median_step_s"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        throughput(starts, 16, warmup=4)


def test_ratio_summary_pairs_rounds():
    runs = {
        "ours": [{"samples_per_s": 9.0}, {"samples_per_s": 4.0}],
        "plain": [{"samples_per_s": 10.0}, {"samples_per_s": 5.0}],
    }
    s = ratio_summary(runs, "ours", "plain")
    assert s["ratio_of_medians"] == pytest.approx(6.5 / 7.5)
    assert s["pairwise_ratios"] == pytest.approx([0.9, 0.8])
    assert s["median_pairwise_ratio"] == pytest.approx(0.85)


def test_quality_reads_the_cli_line():
    out = "noise\neffnet_fashion: test/acc 0.9012  test/f1 0.8990  wall 4m51s  (best checkpoint /x/best.ckpt)\n"
    assert parse(out) == {"test/acc": 0.9012, "test/f1": 0.899, "cli_wall_s": 291}
    with pytest.raises(ValueError):
        parse("Trainer.fit stopped\n")


def smoke(name: str, recipe: str, tmp_path, capsys) -> tuple[dict, dict]:
    """Run ``python -m benchmarks.run NAME --smoke --out tmp_path`` in-process (skipped when ``recipe``'s offline
    assets are missing): (headline line, result file)."""
    from benchmarks.run import main
    from peft_lightning.registry import get_recipe

    ok, why = get_recipe(recipe).availability()
    if not ok:
        pytest.skip(why)
    main([name, "--smoke", "--out", str(tmp_path)])
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the headline is the last line
    assert headline["benchmark"] == name and headline["mode"] == "smoke"
    result = json.loads((tmp_path / f"{name}_smoke.json").read_text())
    assert result["mode"] == "smoke" and result["machine"]["torch"] and len(result["load_avg_end"]) == 3
    return headline, result


@pytest.mark.slow
def test_overhead_smoke_writes_well_formed_results(tmp_path, capsys):
    headline, result = smoke("overhead", "minilm_austen", tmp_path, capsys)
    minilm = result["results"]["minilm"]
    # The comparison is fair: same parameters trained, the very same batches drawn.
    assert minilm["same_trainable_parameters"] is True
    assert minilm["same_batches"] is True
    for key in ("ours_median", "plain_median", "ratio_of_medians"):
        assert math.isfinite(minilm[key]) and minilm[key] > 0
    assert headline["minilm_ratio"] == pytest.approx(minilm["ratio_of_medians"], abs=1e-3)
    assert len(result["load_avg_start"]) == 3
    assert (tmp_path / "overhead_smoke.png").stat().st_size > 1000


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_trainer_smoke_compares_the_same_fine_tune(tmp_path, capsys):
    headline, result = smoke("trainer", "minilm_austen", tmp_path, capsys)
    assert positive(headline["samples_per_s_ratio"], *headline["samples_per_s_ours_hf"])
    assert all(0 <= acc <= 1 for acc in headline["test_acc_ours_hf"])
    assert set(result["runs"]) == {"ours", "hf"}  # and both trained the same parameters, or run() raised


@pytest.mark.slow
def test_caching_smoke_times_both_contenders(tmp_path, capsys):
    from peft_lightning.registry import get_recipe

    ok, why = get_recipe("minilm_austen").availability()
    if not ok:
        pytest.skip(why)
    headline, result = smoke("caching", "effnet_fashion", tmp_path, capsys)
    scenarios = {k: v for k, v in headline.items() if k not in ("benchmark", "mode", "results")}
    assert set(scenarios) == {"effnet_head", "effnet_top", "minilm_top"}
    for name, figures in scenarios.items():
        assert positive(figures["speedup_later_epochs"], figures["uncached_epoch_s"], figures["cached_epoch_s"])
        assert figures["max_epoch_loss_diff"] < 1e-2  # the same curve, cached or not
        cached = result["runs"][name]["cached"][0]
        assert math.isfinite(cached["epoch_loss"][-1]) and "50%" in cached["cache"][-1]  # epoch 1 read the cache


@pytest.mark.slow
def test_adapters_smoke_fills_every_cell(tmp_path, capsys):
    headline, result = smoke("adapters", "effnet_fashion", tmp_path, capsys)
    full, lora, head = headline["effnet_trainable_full_lora_head"]
    assert full > lora > 0 and full > head > 0  # LoRA and the head train a fraction of the model
    assert positive(*headline["effnet_ckpt_mib_full_lora_head"], *headline["effnet_step_s_full_lora_head"])
    ckpt_full, ckpt_lora, _ = headline["effnet_ckpt_mib_full_lora_head"]
    assert ckpt_lora < ckpt_full  # adapter-only checkpoints
    assert set(result["table"]) == {"effnet/full", "effnet/lora", "effnet/head"}


@pytest.mark.slow
def test_quality_smoke_reads_a_recipe_row(tmp_path, capsys):
    headline, result = smoke("quality", "bpr_movielens", tmp_path, capsys)
    assert headline["failed"] == []
    value, wall = headline["metric_and_wall_s"]["bpr_movielens"]
    assert 0 <= value <= 1 and wall > 0
    assert result["rows"]["bpr_movielens"]["command"].startswith("python -m peft_lightning fit --recipe bpr_movielens")


@pytest.mark.slow
def test_time_to_accuracy_smoke_draws_both_curves(tmp_path, capsys):
    from peft_lightning.registry import get_recipe

    ok, why = get_recipe("effnet_fashion").availability()
    if not ok:
        pytest.skip(why)
    headline, result = smoke("time_to_accuracy", "minilm_austen", tmp_path, capsys)
    for domain, ref in (("text", "hf"), ("vision", "plain")):
        figures = result["results"][domain]
        assert headline[domain]["ratio"] == figures["ratio"]
        assert 0 <= figures["target_acc"] <= 1 and positive(*figures["train_s"].values())
        for name, runs in figures["runs"].items():
            for r in runs:
                seconds, accs, steps = zip(*r["curve"])
                assert list(seconds) == sorted(seconds) and list(steps) == sorted(set(steps))
                assert all(0 <= a <= 1 for a in accs)
                # A time to the target is the time of a test point, or None when no point reached it.
                t = figures["time_to_target_s"][name]
                assert t is None or any(abs(t - s) < 0.1 for s in seconds)
        cache = figures["runs"]["ours"][0]["prefix_cache"]
        assert cache["failed"] is None and cache["hits"] > 0  # later epochs trained from the cache
        assert set(figures["runs"]) == {"ours", ref}


def test_choose_summary_finds_the_best_fixed_choice_and_autos_gap():
    from benchmarks.choose import summarise

    def cell(acc, wall):
        return {"test_acc": acc, "wall_s": wall}

    table = {
        "a": {"full": cell(0.80, 10.0), "default": cell(0.85, 5.0), "auto": cell(0.845, 6.0)},
        "b": {"full": cell(0.70, 20.0), "default": cell(0.60, 8.0), "auto": cell(0.72, 12.0)},
    }
    out = summarise(table)
    assert out["per_setting"]["a"]["best_fixed"] == "default"
    assert out["per_setting"]["a"]["auto_minus_best_pts"] == pytest.approx(-0.5)
    assert out["per_setting"]["b"]["auto_time_over_full"] == pytest.approx(0.6)
    assert out["mean_test_acc"]["auto"] == pytest.approx(0.7825)
    head = out["headline"]
    assert head["auto_worst_gap_pts"] == pytest.approx(-0.5) and head["auto_settings_within_1pt"] == 2
    assert head["auto_minus_default_mean_pts"] == pytest.approx(100 * (0.7825 - 0.725))
    assert head["auto_minus_full_mean_pts"] == pytest.approx(100 * (0.7825 - 0.75))
    del table["b"]["full"]  # a contender left out of a setting is compared where it ran
    assert summarise(table)["headline"]["auto_minus_full_mean_pts"] == pytest.approx(100 * (0.845 - 0.80))


@pytest.mark.slow
def test_choose_smoke_runs_its_contenders_on_a_new_task(tmp_path, capsys):
    headline, result = smoke("choose", "effnet_fashion", tmp_path, capsys)
    row = result["table"]["tops96_short"]
    assert set(row) == {"head", "auto"} and all(0 <= c["test_acc"] <= 1 and c["wall_s"] > 0 for c in row.values())
    assert row["auto"]["auto_chose"]  # the run summary's row: what auto chose and why
    assert headline["settings"] == 1 and "auto_worst_gap_pts" in headline
