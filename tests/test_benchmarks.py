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
    out = (
        "noise\neffnet_fashion: test/acc 0.9012  test/f1 0.8990  wall 4m51s  (best checkpoint /x/best.ckpt)\n"
    )
    assert parse(out) == {"test/acc": 0.9012, "test/f1": 0.899, "cli_wall_s": 291}
    with pytest.raises(ValueError):
        parse("Trainer.fit stopped\n")


@pytest.mark.slow
def test_overhead_smoke_writes_well_formed_results(tmp_path, capsys):
    from recipes.minilm_austen import MinilmAusten

    ok, why = MinilmAusten.availability()
    if not ok:
        pytest.skip(why)
    from benchmarks.run import main

    main(["overhead", "--smoke", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    headline = json.loads(last)  # the headline is the last line printed
    assert headline["benchmark"] == "overhead" and headline["mode"] == "smoke"
    result = json.loads((tmp_path / "overhead_smoke.json").read_text())
    minilm = result["results"]["minilm"]
    # The comparison is fair: same parameters trained, the very same batches drawn.
    assert minilm["same_trainable_parameters"] is True
    assert minilm["same_batches"] is True
    for key in ("ours_median", "plain_median", "ratio_of_medians"):
        assert math.isfinite(minilm[key]) and minilm[key] > 0
    assert headline["minilm_ratio"] == pytest.approx(minilm["ratio_of_medians"], abs=1e-3)
    assert len(result["load_avg_start"]) == 3 and result["machine"]["torch"]
    assert (tmp_path / "overhead_smoke.png").stat().st_size > 1000
