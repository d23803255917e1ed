"""``compare --seeds`` and ``--budget``: the budget parsing and the steps a budget buys, the seed aggregation by
hand, and end to end on the tiny model: the smoke preset with the new methods (kto, rloo beside dpo, simpo, orpo,
grpo), and two seeds under a token budget (calibration, layout, spread and the verdict over prompts and seeds)."""

import json

import pytest

from alignlab.errors import UserError
from alignlab.experiments.compare import (
    CompareConfig, cost_per_step, over_seeds, parse_budget, steps_for_budget,
)
from alignlab.experiments.layout import run_name
from tests.conftest import run_cli


def test_budget_parsing_and_the_steps_it_buys():
    assert parse_budget("200000tokens") == ("tokens", 200000.0) and parse_budget("600s") == ("seconds", 600.0)
    for bad in ("600", "10 minutes", "0s", "-5tokens"):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)
    # three one-step rows: 100, 200 and 200 tokens in 10, 2 and 4 seconds; the first (warm-up) step is not timed
    rows = [{"step": 1, "num_tokens": 100, "tokens_per_second": 10.0},
            {"step": 2, "num_tokens": 300, "tokens_per_second": 100.0},
            {"step": 3, "num_tokens": 500, "tokens_per_second": 50.0}]
    cost = cost_per_step(rows)
    assert cost == {"steps": 3, "tokens_per_step": pytest.approx(500 / 3), "seconds_per_step": pytest.approx(3.0)}
    assert steps_for_budget("1000tokens", cost) == 6  # floor(1000 / 166.7)
    assert steps_for_budget("30s", cost) == 10
    assert steps_for_budget("1s", cost, min_steps=2) == 2
    with pytest.raises(UserError, match="not both"):
        CompareConfig(output_dir="x", preset="smoke", budget="10s", max_steps=3)


def test_seed_layout_and_aggregation_by_hand():
    assert run_name("dpo", 42, [42]) == "dpo" and run_name("dpo", 43, [42, 43]) == "dpo/seed-43"
    one = {"status": "ok", "mean_reward": 1.0, "win_rate_vs_base": 0.5, "kl_to_base": 2.0, "mean_length": 10.0,
           "wall_seconds": 4.0, "peak_rss_bytes": 100, "num_tokens": 50, "prompt_scores": [[0.0, 2.0]],
           "samples": [{"prompt": "p"}], "model_dir": "dpo/seed-42/model"}
    two = {**one, "mean_reward": 3.0, "kl_to_base": 4.0, "wall_seconds": 6.0, "peak_rss_bytes": 300,
           "prompt_scores": [[2.0, 4.0]], "model_dir": "dpo/seed-43/model"}
    entry = over_seeds({42: one, 43: two, 44: {"status": "failed", "error": "boom"}})
    assert entry["status"] == "ok" and entry["failed_seeds"] == {"44": "boom"}
    assert entry["mean_reward"] == 2.0 and entry["kl_to_base"] == 3.0 and entry["wall_seconds"] == 5.0
    assert entry["peak_rss_bytes"] == 300 and entry["model_dir"] == "dpo/seed-42/model"
    assert entry["prompt_scores"] == [[[0.0, 2.0]], [[2.0, 4.0]]]  # (K, samples, P) for the verdict
    # seed spread of the means 1 and 3: mean 2, sample std sqrt(2)
    assert entry["seed_spread"] == {"mean": 2.0, "std": pytest.approx(2**0.5), "n_seeds": 2}
    # interval over the 4 completions 0, 2, 2, 4: 2 +- 1.96 * 1.633 / 2
    assert entry["reward_ci95"] == pytest.approx([2 - 1.96 * (8 / 3) ** 0.5 / 2, 2 + 1.96 * (8 / 3) ** 0.5 / 2])
    failed = over_seeds({42: {"status": "failed", "error": "x"}})
    assert failed["status"] == "failed" and failed["error"] == "seed 42: x"


@pytest.mark.integration
def test_smoke_preset_with_the_new_methods(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "--preset", "smoke", "--task", "kid-stories",
                                "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                                "--methods", "dpo", "simpo", "orpo", "kto", "grpo", "rloo")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", "dpo", "simpo", "orpo", "kto", "grpo", "rloo"]
    for method, entry in results["methods"].items():
        assert entry["status"] == "ok", (method, entry.get("error"))
    kto_args = (out / "kto" / "args.yaml").read_text()
    assert "pairs.jsonl" in kto_args and "per_device_train_batch_size: 8" in kto_args  # 4 pairs split in 2
    rows = [json.loads(line) for line in (out / "kto" / "model" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and "rewards/margins" in rows[-1]
    rloo_rows = [json.loads(line) for line in (out / "rloo" / "model" / "metrics.jsonl").read_text().splitlines()]
    assert len(rloo_rows) == 2 and "clip_ratio/region_mean" in rloo_rows[0]
    assert results["verdict"]["best"] in results["methods"]


@pytest.mark.integration
def test_two_seeds_under_a_token_budget(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = run_cli(capsys, "compare", "--preset", "smoke", "--task", "kid-stories",
                           "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--methods", "dpo", "kto",
                           "--seeds", "2", "--budget", "1500tokens")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    budget = results["budget"]
    assert budget["seeds"] == [42, 43] and budget["budget"] == "1500tokens"
    for method in ("dpo", "kto"):
        entry = results["methods"][method]
        assert entry["status"] == "ok", entry
        calibration = [json.loads(l) for l in (out / method / "calibration" / "model" / "metrics.jsonl").read_text().splitlines()]
        per_step = calibration[-1]["num_tokens"] / calibration[-1]["step"]
        assert budget["max_steps"][method] == max(1, int(1500 // per_step))
        for seed in (42, 43):
            run = json.loads((out / method / f"seed-{seed}" / "result.json").read_text())
            assert run["status"] == "ok" and run["seed"] == seed and run["max_steps"] == budget["max_steps"][method]
            assert f"seed: {seed}" in (out / method / f"seed-{seed}" / "args.yaml").read_text()
            # each seed trains on its own draw of pairs, sampled with that seed
            assert str(out / "pairs" / f"seed-{seed}.jsonl") in (out / method / f"seed-{seed}" / "args.yaml").read_text()
        means = [entry["seeds"][str(s)]["mean_reward"] for s in (42, 43)]
        assert entry["seed_spread"]["n_seeds"] == 2 and entry["seed_spread"]["mean"] == pytest.approx(sum(means) / 2)
        assert len(entry["prompt_scores"]) == 2  # 2 seeds x 1 sample per prompt
    assert "seeds)" in (out / "report.html").read_text()  # the spread column
    draws = [(out / "pairs" / f"seed-{seed}.jsonl").read_text() for seed in (42, 43)]
    assert draws[0] != draws[1] and not (out / "pairs.jsonl").exists()
    assert results["pairs"]["seeds"]["43"]["pairs"] == len(draws[1].splitlines())
    assert "drawn for each seed with that seed" in (out / "report.html").read_text()
