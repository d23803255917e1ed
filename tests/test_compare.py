"""``alignlab evaluate`` and ``alignlab compare``: the statistics by hand, the shared budget, and the smoke
preset end to end on the tiny model (report, failure of one method, resume)."""

import html
import json
import math

import pytest
import torch

from alignlab.experiments.compare import PRESETS, Compare, CompareConfig, last_line, tune_stage_name
from alignlab.experiments.evaluate import confidence_interval, prompt_text, win_rate
from tests.conftest import one_line, run_cli


def test_confidence_interval_by_hand():
    # mean 2.5; sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3) = 1.290994;
    # half width 1.96 * 1.290994 / sqrt(4) = 1.265174
    low, high = confidence_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert low == pytest.approx(2.5 - 1.265174, abs=1e-5) and high == pytest.approx(2.5 + 1.265174, abs=1e-5)
    assert confidence_interval(torch.tensor([0.7])) == pytest.approx((0.7, 0.7))


def test_win_rate_counts_ties_half():
    # win, tie, loss -> (1 + 0.5 + 0) / 3
    assert win_rate(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 4.0])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.5])) == 1.0
    # more base samples: prompt 0, model 2 against base (1, 2, 3) -> (1 + 0.5 + 0) / 3 = 0.5; prompt 1, model 5
    # against (1, 1, 9) -> 2 / 3; mean (0.5 + 2/3) / 2 = 7/12
    assert win_rate(torch.tensor([[2.0], [5.0]]), torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0]])) == \
        pytest.approx(7 / 12)
    # two samples against two: prompt 0, (1, 4) vs (2, 3) -> 2/4; prompt 1, (0, 0) vs (0, 1) -> (0.5 + 0 + 0.5 + 0)/4
    assert win_rate(torch.tensor([[1.0, 4.0], [0.0, 0.0]]), torch.tensor([[2.0, 3.0], [0.0, 1.0]])) == \
        pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(torch.zeros(2), torch.zeros(3))


def test_prompt_text_and_last_line():
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]) == "hi"
    assert prompt_text("plain") == "plain"
    assert last_line("training: 10%\rtraining: 20%\n\nalignlab dpo: error: bad row\n\n") == "alignlab dpo: error: bad row"
    assert last_line("") == ""
    # a process killed mid-step leaves the progress bar last: it is never the error
    assert last_line("Traceback ...\nRuntimeError: CUDA error\ntraining:   0%|          | 0/2 [00:00<?, ?step/s]") \
        == "RuntimeError: CUDA error"


def test_the_cli_records_a_failed_commands_error_line(capsys, tmp_path, monkeypatch, pairs_file):
    # compare reads each method's error from the file ALIGNLAB_ERROR_FILE names: a user error's one line, or
    # an unexpected exception's last line (its traceback still printed)
    from alignlab.errors import ERROR_FILE_ENV

    error_file = tmp_path / "error.txt"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    code, _, _ = run_cli(capsys, "dpo", "--dataset_name", str(pairs_file), "--output_dir", str(tmp_path / "x"),
                         "--beta", "-1")
    assert code == 1 and error_file.read_text().strip() == "alignlab dpo: error: --beta must be > 0, got -1.0"

    import dataclasses

    from alignlab import methods

    def crash(config):
        raise RuntimeError("CUDA error: out of memory\nmore details")

    monkeypatch.setitem(methods._METHODS, "dpo", dataclasses.replace(methods.get_method("dpo"), train=crash))
    with pytest.raises(RuntimeError):
        run_cli(capsys, "dpo", "--dataset_name", str(pairs_file), "--output_dir", str(tmp_path / "y"))
    assert error_file.read_text().strip() == "RuntimeError: more details"


def test_every_method_gets_the_same_budget(tmp_path):
    cfg = CompareConfig(output_dir=str(tmp_path), task="arithmetic", preset="default",
                        methods=["dpo", "ppo", "ppo-rule", "grpo", "online-dpo", "iterative-dpo"])
    run = Compare(cfg)
    args = {m: run.method_args(m) for m in cfg.methods + ["reward-model"]}
    assert {a["max_steps"] for m, a in args.items() if m != "iterative-dpo"} == {cfg.max_steps}
    assert args["iterative-dpo"]["max_steps"] * args["iterative-dpo"]["rounds"] == cfg.max_steps
    # prompts per step: GRPO's and PPO's batches count completions, num_generations of each prompt
    for m in ("grpo", "ppo", "ppo-rule"):
        assert args[m]["per_device_train_batch_size"] == cfg.prompts_per_step * cfg.num_generations
        assert args[m]["num_generations"] == cfg.num_generations
    for m in ("dpo", "online-dpo", "iterative-dpo", "reward-model"):
        assert args[m]["per_device_train_batch_size"] == cfg.prompts_per_step
    # one completion budget (the task's: 16 tokens for arithmetic) and the task's reward for the rule-based ones
    assert args["ppo"]["response_length"] == args["grpo"]["max_completion_length"] == args["online-dpo"]["max_new_tokens"] == 16
    assert args["grpo"]["reward_funcs"] == ["alignlab.tasks.arithmetic:arithmetic_reward"]
    # the default preset trains two seeds, each PPO run with the reward model of its own seed
    assert args["ppo"]["reward_model_path"].endswith("reward-model/seed-42/model") and "reward_funcs" not in args["ppo"]
    assert len(run.train_rows) == 32 and len(run.eval_rows) == 64  # the default preset's sizes
    # a --tune trial of ppo reads the reward model trained on the tuning-train pairs, not the final run's
    tune = {"steps": 4, "prompts": tmp_path / "tune" / "train.jsonl", "pairs": tmp_path / "tune" / "pairs.jsonl",
            "values": {"learning_rate": 1e-5}}
    trial = run.method_args("ppo", {**tune, "stages": {"reward-model": tune_stage_name("reward-model")}})
    assert trial["reward_model_path"] == str(tmp_path / "reward-model" / "tune" / "model")
    stage = run.method_args("reward-model", {"prompts": tune["prompts"], "pairs": tune["pairs"]})
    assert stage["dataset_name"] == str(tune["pairs"]) and stage["max_steps"] == args["reward-model"]["max_steps"]
    # each method's learning rate and KL coefficient: the preset's per-method values (an offline --tune sweep)
    values = PRESETS["default"]["method_values"]
    for m in ("dpo", "ppo", "ppo-rule", "grpo", "online-dpo"):
        assert args[m]["learning_rate"] == values[m]["learning_rate"]
    assert args["dpo"]["beta"] == values["dpo"]["beta"] and args["ppo"]["kl_coef"] == values["ppo"]["beta"]
    assert args["online-dpo"]["beta"] == values["online-dpo"]["beta"]
    fair = run.run_fairness()
    assert "offline" in fair["sentence"] and f"dpo: learning rate {values['dpo']['learning_rate']:g}" in fair["sentence"]
    # --learning_rate replaces every method's rate (the preset's KL coefficients stay)
    one = Compare(CompareConfig(output_dir=str(tmp_path), task="arithmetic", preset="default", learning_rate=3e-6,
                                methods=["dpo", "grpo"]))
    assert {one.method_args(m)["learning_rate"] for m in ("dpo", "grpo")} == {3e-6}
    assert "offline" not in one.run_fairness()["sentence"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--methods", "dpo", "sft"], "unknown method 'sft'"),
        (["--task", "no-such-task"], "neither a built-in task"),
        (["--samples_per_prompt", "1"], "--samples_per_prompt must be >= 2"),
        (["--methods", "iterative-dpo", "--max_steps", "1"], "--max_steps >= 2"),
    ],
)
def test_compare_flag_errors_are_one_line(capsys, tmp_path, argv, expected):
    code, _, err = run_cli(capsys, "compare", "--output_dir", str(tmp_path / "c"), "--preset", "smoke", *argv)
    assert code != 0 and expected in one_line(err)


def test_prompts_file_needs_reward_funcs(capsys, tmp_path, prompts_file):
    code, _, err = run_cli(capsys, "compare", "--output_dir", str(tmp_path / "c"), "--task", str(prompts_file))
    assert code == 1 and "needs --reward_funcs" in one_line(err)


def test_evaluate_same_model_twice_ties_with_zero_kl(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--model_name_or_path", tiny_model_dir, tiny_model_dir, "--model_names", "a", "b",
        "--task", "arithmetic", "--num_prompts", "4", "--max_new_tokens", "4", "--output_file", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())["methods"]
    # the same seed for every model: identical samples, so every prompt ties; the KL is zero up to rounding (the
    # model's log-probs are the sampler's, the base's come from a forward)
    assert results["b"]["win_rate_vs_base"] == 0.5 and results["b"]["kl_to_base"] == pytest.approx(0.0, abs=1e-2)
    assert results["a"]["mean_reward"] == results["b"]["mean_reward"]
    assert results["b"]["completions"] == 4 and len(results["b"]["samples"]) == 4
    assert "win vs base" in stdout and f"results: {out}" in stdout


def test_evaluate_samples_the_base_model_more(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, _, err = run_cli(
        capsys, "evaluate", "--model_name_or_path", tiny_model_dir, tiny_model_dir, "--model_names", "a", "b",
        "--task", "arithmetic", "--num_prompts", "4", "--max_new_tokens", "4", "--samples_per_prompt", "2",
        "--base_samples_per_prompt", "3", "--output_file", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())["methods"]
    base, other = torch.tensor(results["a"]["prompt_scores"]), torch.tensor(results["b"]["prompt_scores"])
    assert base.shape == (3, 4) and other.shape == (2, 4)
    assert results["a"]["completions"] == 12 and results["b"]["completions"] == 8
    assert results["b"]["win_rate_vs_base"] == pytest.approx(win_rate(other.t(), base.t()))


def test_evaluate_rejects_a_model_with_another_tokenizer(capsys, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<new_token_for_test>"])
    tok.save_pretrained(other)
    code, _, err = run_cli(capsys, "evaluate", "--model_name_or_path", tiny_model_dir, str(other), "--task",
                           "arithmetic", "--num_prompts", "2", "--max_new_tokens", "2")
    assert code == 1 and "tokenizer differs" in one_line(err)


REQUIRED = ("mean_reward", "reward_ci95", "win_rate_vs_base", "kl_to_base", "mean_length", "wall_seconds",
            "peak_rss_bytes")


@pytest.mark.integration  # one process per method
def test_smoke_preset_end_to_end(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "--preset", "smoke", "--task", "kid-stories",
                                "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                                "--base_eval_samples_per_prompt", "2")
    assert code == 0, err
    assert f"report: {out / 'report.html'}" in stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", "dpo", "ppo", "ppo-rule", "grpo", "online-dpo"]
    for method, entry in results["methods"].items():
        assert entry["status"] == "ok", (method, entry.get("error"))
        for key in REQUIRED[:5]:
            assert key in entry, (method, key)
        if method != "base":
            assert entry["wall_seconds"] > 0 and entry["peak_rss_bytes"] > 50 * 2**20 and entry["num_tokens"] > 0
            assert (out / method / "args.yaml").exists() and (out / method / "model" / "metrics.jsonl").exists()
    base = results["methods"]["base"]
    assert base["kl_to_base"] == 0.0 and base["win_rate_vs_base"] == 0.5
    assert base["reward_ci95"][0] <= base["mean_reward"] <= base["reward_ci95"][1]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert len(pairs) == results["pairs"]["pairs"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "src=\"http" not in page
    for name in ("training_curves.png", "reward_vs_kl.png", "reward_bars.png"):
        assert (out / name).stat().st_size > 1000
    assert results["budget"]["max_steps"] == 2 and results["budget"]["prompts_per_step"] == 4
    assert math.isfinite(results["methods"]["ppo"]["reward_model_seconds"])
    verdict = results["verdict"]  # paired comparisons on the 8 held-out prompts, named in the report
    assert verdict["best"] in results["methods"] and verdict["sentence"] in html.unescape(page)
    assert set(verdict["pareto_front"]) <= set(results["methods"])
    assert all(len(results["methods"][m]["prompt_scores"][0]) == 8 for m in results["methods"])
    # the base sampled twice per held-out prompt, every method once
    assert len(base["prompt_scores"]) == 2 and len(results["methods"]["dpo"]["prompt_scores"]) == 1
    assert results["budget"]["base_eval_samples_per_prompt"] == 2
    assert "1 sampled completion(s) each (2 for the base model)" in " ".join(results["fairness"]["equalised"])


@pytest.mark.integration  # one process per method
def test_a_failing_method_is_marked_and_resume_reuses_the_rest(tiny_model_dir, prompts_file, rewards_file,
                                                               tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    cfg = dict(output_dir=str(out), task=str(prompts_file), reward_funcs=[f"{rewards_file}:short"],
               preset="smoke", methods=["dpo", "grpo"], model_name_or_path=tiny_model_dir, num_eval_prompts=2,
               prompts_per_step=2, max_new_tokens=6, eval_split_size=0.34)
    method_args = Compare.method_args

    def broken(self, method, trial=None):
        args = method_args(self, method, trial)
        return {**args, "no_such_flag": 1} if method == "grpo" else args

    monkeypatch.setattr(Compare, "method_args", broken)
    results = Compare(CompareConfig(**cfg)).run()
    grpo, dpo = results["methods"]["grpo"], results["methods"]["dpo"]
    assert grpo["status"] == "failed" and "unknown key 'no_such_flag'" in grpo["error"]
    assert dpo["status"] == "ok" and "mean_reward" in dpo
    assert "failed: " in (out / "report.html").read_text()

    monkeypatch.setattr(Compare, "method_args", method_args)
    weights = out / "dpo" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    results = Compare(CompareConfig(**cfg, resume=True)).run()
    assert weights.stat().st_mtime_ns == before  # dpo reused, not retrained
    assert results["methods"]["grpo"]["status"] == "ok"
    assert results["methods"]["dpo"]["mean_reward"] == dpo["mean_reward"]


def test_evaluate_with_a_reward_model_on_a_prompts_file(capsys, tiny_model_dir, tiny_tokenizer, prompts_file, tmp_path):
    from alignlab.models import load_reward_model

    out = tmp_path / "eval.json"
    # the tiny causal LM with a sequence-classification head, saved: a reward model (an untrained one is refused)
    rm_dir = tmp_path / "rm"
    load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    code, _, err = run_cli(capsys, "evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name",
                           str(prompts_file), "--reward_model_path", str(rm_dir), "--max_new_tokens", "4",
                           "--output_file", str(out))
    assert code == 0, err
    base = json.loads(out.read_text())["methods"][tiny_model_dir]
    assert base["completions"] == 6 and math.isfinite(base["rewards/reward_model"])
    assert base["mean_reward"] == pytest.approx(base["rewards/reward_model"], abs=1e-5)


def test_tuning_grid_split_and_flags():
    from alignlab.experiments.tuning import grid, kl_flag, parse_tune, validation_split
    from alignlab.methods import get_method

    # the starting value first (ties keep it), then the other multiples, rounded to 6 significant digits
    assert grid(2e-5, [0.5, 1.0, 2.0]) == [2e-5, 1e-5, 4e-5]
    assert parse_tune(["lr,beta"]) == ["learning_rate", "beta"] and parse_tune(["kl", "learning_rate"]) == [
        "learning_rate", "beta"]
    assert kl_flag(get_method("ppo").config) == "kl_coef" and kl_flag(get_method("dpo").config) == "beta"
    assert kl_flag(get_method("reinforce-pp").config) == "init_kl_coef" and kl_flag(get_method("sft").config) is None
    rows = list(range(20))
    train, validation = validation_split(rows, 0.25, seed=3, min_train=4)
    assert len(validation) == 5 and sorted(train + validation) == rows and not set(train) & set(validation)
    assert validation_split(rows, 0.25, seed=3, min_train=4) == (train, validation)  # seeded
    from alignlab.errors import UserError

    with pytest.raises(UserError, match="leave 1 for tuning runs"):
        validation_split(list(range(3)), 0.5, seed=0, min_train=4)


@pytest.mark.integration  # one process per trial and method
def test_tune_chooses_on_the_validation_split_of_the_training_prompts(tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    from alignlab.experiments import evaluate as evaluate_module

    evaluated = []  # (prompts file, prompts) of every Evaluator the run builds
    init = evaluate_module.Evaluator.__init__

    def spy(self, config):
        init(self, config)
        evaluated.append((config.dataset_name, [json.dumps(e["prompt"]) for e in self.prompts]))

    monkeypatch.setattr(evaluate_module.Evaluator, "__init__", spy)
    out = tmp_path / "cmp"
    cfg = CompareConfig(output_dir=str(out), task="kid-stories", preset="smoke", methods=["dpo", "grpo"],
                        model_name_or_path=tiny_model_dir, tune=["lr,beta"], tune_factors=[1.0, 2.0],
                        )
    results = Compare(cfg).run()
    read = lambda path: [json.dumps(json.loads(line)["prompt"]) for line in path.read_text().splitlines()]
    train, held_out = set(read(out / "train.jsonl")), set(read(out / "eval.jsonl"))
    validation = set(read(out / "tune" / "validation.jsonl"))
    assert validation and validation <= train and not validation & held_out
    # tuning validated on the validation prompts only; the held-out prompts were read once, after the tuning
    assert [name for name, _ in evaluated] == [str(out / "tune" / "validation.jsonl"), str(out / "eval.jsonl")]
    assert set(evaluated[0][1]) == validation and set(evaluated[1][1]) == held_out
    tuning = results["tuning"]["methods"]
    # dpo: learning rate x {1, 2}, then beta x 2 at the best rate; grpo: beta 0 (no KL term) is not tuned
    assert len(tuning["dpo"]["trials"]) == 3 and len(tuning["grpo"]["trials"]) == 2
    for method, t in tuning.items():
        best = max(t["trials"], key=lambda trial: trial["validation_reward"])
        assert t["chosen"] == {k: best[k] for k in t["chosen"]}
        for trial in t["trials"]:  # trials train on the tuning-train prompts (or their pairs) only
            args = yaml.safe_load((out / trial["run"] / "args.yaml").read_text())
            names = args["dataset_name"] if isinstance(args["dataset_name"], list) else [args["dataset_name"]]
            assert all(str(name).startswith(str(out / "tune")) for name in names), names
            assert args["max_steps"] == cfg.tune_steps == 1
        final = yaml.safe_load((out / method / "args.yaml").read_text())
        assert final["learning_rate"] == t["chosen"]["learning_rate"]
    assert yaml.safe_load((out / "dpo" / "args.yaml").read_text())["beta"] == tuning["dpo"]["chosen"]["beta"]
    fairness = results["fairness"]
    assert "validation split" in fairness["sentence"] and any("optimizer steps" in x for x in fairness["equalised"])
    page = html.unescape((out / "report.html").read_text())
    assert fairness["sentence"] in page and "validation reward" in page


def test_fairness_names_the_shared_group_size():
    from alignlab.experiments.tuning import fairness

    budget = dict(max_steps=8, train_prompts=32, prompts_per_step=4, max_new_tokens=40, temperature=1.0, seeds=[42],
                  eval_prompts=32, eval_samples_per_prompt=1, grpo_num_generations=4,
                  learning_rate={"dpo": 2e-5, "grpo": 2e-5, "online-dpo": 2e-5})
    fair = fairness(budget, None, None, ["dpo", "grpo", "online-dpo"])
    assert "4 sampled completions per prompt for grpo, online-dpo (Online DPO trains on the best and the worst of " \
           "them)" in fair["equalised"]
    assert not any("completions per prompt" in x for x in fairness(budget, None, None, ["dpo"])["equalised"])
    assert "4 sampled completions per prompt for grpo, ppo-rule (PPO scores each against its value model)" in \
        fairness(budget, None, None, ["grpo", "ppo-rule"])["equalised"]
    assert fair["sentence"].startswith("Nothing was tuned in this run; learning rates: dpo 2e-05, grpo 2e-05")


def test_the_report_says_what_a_method_below_the_base_measured(tmp_path):
    from alignlab.experiments.report import learning_sentences

    def run(name, rewards, zero_std):
        model = tmp_path / name / "model"
        model.mkdir(parents=True)
        rows = [{"step": i + 1, "reward": r, "frac_reward_zero_std": z} for i, (r, z) in enumerate(zip(rewards, zero_std))]
        (model / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {"status": "ok", "mean_reward": 0.0, "model_dir": str(model)}

    # grpo's two seeds: rewards 0, 0, 0, 0.2 and 0, 0, 0.2, 0.2 (step 1: 0; last half: 0.1 and 0.2, mean 0.15); 3
    # and 2 steps where every group tied (mean 2.5); ppo-rule is above the base, so no sentence
    seeds = {"42": run("grpo/seed-42", [0, 0, 0, 0.2], [1, 1, 1, 0]), "43": run("grpo/seed-43", [0, 0, 0.2, 0.2], [1, 1, 0, 0])}
    results = {"methods": {"base": {"status": "ok", "mean_reward": 0.0},
                           "grpo": {"status": "ok", "mean_reward": 0.0, "kl_to_base": 0.03, "seeds": seeds},
                           "ppo-rule": run("ppo-rule", [0.1], [0])},
               "verdict": {"vs_base": {"grpo": {"mean_diff": 0.0, "ci": [-0.01, 0.01]},
                                       "ppo-rule": {"mean_diff": 0.1, "ci": [0.05, 0.15]}}}}
    assert learning_sentences(results) == [
        "grpo is not above the base (+0.000 [-0.010, 0.010]): its training task reward (reward) was 0.000 at step 1 "
        "and 0.150 over the last half of its 4 steps, mean of 2 seeds; at 2.5 of those steps every completion of "
        "every prompt scored the same (frac_reward_zero_std 1), so they had no gradient; KL to the base 0.03."]
