"""TRL 1.16's online flags and metric names on GRPO / RLOO, on the tiny model: the sampling flags (``top_k``,
``min_p``, ``repetition_penalty``) reach generation, ``mask_truncated_completions`` takes truncated rows out of the
loss, ``steps_per_generation`` / ``generation_batch_size`` give several optimizer steps per generation,
``log_completions`` writes sample rows, evaluation on eval prompts, ``--reward_model_name_or_path``, the reward
spec forms (``pkg.mod.fn``, TRL's built-in names), and the metrics ``clip_ratio/*``, ``completions/*`` and
``entropy`` (from the chunked output head, against full logits)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from alignlab.algorithms.grpo import GRPOConfig, GRPOTrainer
from alignlab.algorithms.rloo import RLOOConfig, RLOOTrainer, rloo_policy_loss
from alignlab.errors import UserError
from alignlab.losses.ppo import clip_ratio_metrics
from alignlab.rollout.engines import Completions
from alignlab.rollout.experience import ScoredCompletions
from alignlab.rollout.rewards import load_reward_func
from tests.conftest import one_line, read_metrics, run_cli


def _grpo(model, data, rewards, out, **kw) -> GRPOConfig:
    """2 prompts x 4 completions of at most 6 tokens per step, in 2 micro-batches of 4."""
    settings = {"model_name_or_path": model, "dataset_name": str(data), "output_dir": str(out),
                "reward_funcs": [f"{rewards}:short"], "num_generations": 4, "max_completion_length": 6,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 1,
                "learning_rate": 1e-3, "save_steps": 0, "bf16": False, "sample_steps": 0}
    return GRPOConfig(**{**settings, **kw})


def _sample(trainer, **kw):
    with torch.no_grad():
        return trainer.setup.sample(trainer.policy, trainer.prompts[:2], max_new_tokens=6, **kw)


# --- sampling flags -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_sample_the_greedy_completion(tiny_model_dir, prompts_file, rewards_file, tmp_path, flag):
    trainer = GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", temperature=1.5, **flag))
    torch.manual_seed(0)
    sampled = _sample(trainer, num_generations=4).completions.ids
    greedy = _sample(trainer, do_sample=False).completions.ids
    assert sampled == [g for g in greedy for _ in range(4)]
    plain = GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "p", temperature=1.5))
    torch.manual_seed(0)
    assert _sample(plain, num_generations=4).completions.ids != sampled  # without the flag: draws differ


def test_repetition_penalty_reaches_generation(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    def repeats(trainer) -> bool:
        scored = _sample(trainer)
        out = False
        for example, ids in zip(scored.examples, scored.completions.ids):
            seen = set(example["prompt_ids"])
            for token in ids:
                out |= token in seen
                seen.add(token)
        return out

    cfg = dict(top_k=1, max_completion_length=6)  # top_k 1: the most likely token after the penalty
    assert repeats(GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "a", **cfg)))
    # a large penalty pushes every token of the prompt and of the completion so far below the unseen ones
    penalised = GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "b", repetition_penalty=1e4,
                                  **cfg))
    assert not repeats(penalised)


def test_the_paged_engine_refuses_a_repetition_penalty():
    from alignlab.rollout.engines import PagedEngine, SamplingParams

    params = SamplingParams(max_new_tokens=2, eos_token_id=0, pad_token_id=0, repetition_penalty=1.2)
    with pytest.raises(UserError, match="cannot apply --repetition_penalty"):
        PagedEngine(torch.nn.Linear(1, 1)).generate([[1]], params)


def test_sampling_flags_are_range_checked_in_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path):
    base = ["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file), "--output_dir",
            str(tmp_path / "o"), "--reward_funcs", f"{rewards_file}:short"]
    for extra, message in ((["--min_p", "1.5"], "--min_p must be in [0, 1]"),
                           (["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
                           (["--top_k", "-1"], "--top_k must be >= 0")):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code != 0 and message in one_line(err)


# --- mask_truncated_completions -------------------------------------------------------------------------------
@pytest.fixture
def half_terminated(monkeypatch):
    """Engines whose every other completion ends with EOS (the tiny random model almost never draws it)."""
    import alignlab.rollout.experience as experience

    original = experience.engine_for

    class HalfEOS:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompt_ids, params):
            out = self.engine.generate(prompt_ids, params)
            ids = [row[:-1] + [params.eos_token_id] if i % 2 == 0 else row for i, row in enumerate(out.ids)]
            return Completions(ids=ids, has_eos=[i % 2 == 0 for i in range(len(ids))], prompt_index=out.prompt_index)

    monkeypatch.setattr(experience, "engine_for", lambda model, backend="auto": HalfEOS(original(model, backend)))


@pytest.mark.parametrize("trainer_cls, config_cls", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_mask_truncated_completions_zeroes_their_loss(tiny_model_dir, prompts_file, rewards_file, tmp_path,
                                                      half_terminated, trainer_cls, config_cls):
    from alignlab.data.sequences import slice_rows

    settings = dict(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(tmp_path / "m"),
                    reward_funcs=[f"{rewards_file}:short"], num_generations=4, max_completion_length=6,
                    per_device_train_batch_size=8, max_steps=1, save_steps=0, bf16=False, beta=0.0)
    plain = trainer_cls(config_cls(**settings))
    trainer = trainer_cls(config_cls(**settings, mask_truncated_completions=True))
    terminated = torch.tensor([i % 2 == 0 for i in range(8)])  # prompt-major order, before any shuffle
    with torch.no_grad():
        full, _, _ = plain._sampled_batch(plain.policy, plain.prompts[:2], step=1)
        data, metrics, _ = trainer._sampled_batch(trainer.policy, trainer.prompts[:2], step=1)
    assert float(metrics["completions/clipped_ratio"].mean()) == 0.5
    rows = data["response_mask"].sum(-1)
    assert torch.all(rows[~terminated] == 0) and torch.all(rows[terminated] > 0)
    assert torch.all(full["response_mask"].sum(-1) > 0)  # without the flag every row counts
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    (update,) = rollout.updates
    assert rollout.scalars["num_items_in_batch"] == float(update[0]["response_mask"].sum())
    # the loss on the truncated rows alone: no gradient reaches the policy
    only_truncated = {**slice_rows(data, (~terminated).nonzero().flatten()), "num_items_in_batch": 1.0}
    trainer.policy.zero_grad()
    [(loss, _)] = trainer.compute_loss(trainer.policy, only_truncated)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in trainer.policy.parameters())
    # the terminated rows train as before
    only_terminated = {**slice_rows(data, terminated.nonzero().flatten()), "num_items_in_batch": 1.0}
    [(loss, _)] = trainer.compute_loss(trainer.policy, only_terminated)
    loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in trainer.policy.parameters())


# --- steps_per_generation / generation_batch_size -------------------------------------------------------------
@pytest.mark.parametrize("flag", [{"steps_per_generation": 4}, {"generation_batch_size": 16}])
def test_one_generation_feeds_several_optimizer_steps(tiny_model_dir, prompts_file, rewards_file, tmp_path, monkeypatch,
                                                      flag):
    import alignlab.train.loop as loop

    calls = []
    real = loop.guarded_optimizer_step
    monkeypatch.setattr(loop, "guarded_optimizer_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    # 4 micro-batches of 4 completions per generation (4 prompts x 4), 2 per optimizer step: 2 optimizer steps
    cfg = _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "s", **flag)
    assert cfg.updates_per_generation == 2
    trainer = GRPOTrainer(cfg)
    assert trainer.prompts_per_step == 4
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:4], 1)
    assert [len(u) for u in rollout.updates] == [2, 2]
    assert {len(mb["advantages"]) for u in rollout.updates for mb in u} == {4}
    # dapo: each micro-batch divides by the generation's tokens / its 4 micro-batches
    tokens = sum(float(mb["response_mask"].sum()) for u in rollout.updates for mb in u)
    assert rollout.scalars["num_items_in_batch"] == pytest.approx(tokens / 4)
    trainer.train()
    assert len(calls) == 2  # one generation (max_steps 1), two optimizer steps


@pytest.mark.parametrize("flags, message", [
    ({"steps_per_generation": 3}, "not a multiple of --gradient_accumulation_steps 2"),
    ({"steps_per_generation": 2, "generation_batch_size": 8}, "can not be both configured"),
    ({"generation_batch_size": 6}, "must be divisible by the global batch size"),
])
def test_generation_batch_flags_are_checked(tiny_model_dir, prompts_file, rewards_file, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "x", **flags)


# --- log_completions, evaluation, reward model ----------------------------------------------------------------
def test_log_completions_and_evaluation_with_trl_names(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "ev"
    cfg = _grpo(tiny_model_dir, prompts_file, rewards_file, out, max_steps=2, log_completions=True, logging_steps=1,
                eval_dataset_name=str(prompts_file), eval_steps=1, per_device_eval_batch_size=8)
    GRPOTrainer(cfg).train()
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [1, 2]
    for name in ("eval_reward", "eval_reward_std", "eval_rewards/short/mean", "eval_completions/mean_length",
                 "eval_completions/clipped_ratio", "eval_entropy", "eval_clip_ratio/region_mean", "eval_loss"):
        assert all(math.isfinite(r[name]) for r in evals), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 2 * 8  # sample_steps 0: the flag's
    assert {"prompt", "completion", "advantage", "rewards/short"} <= set(samples[0])


def test_rloo_evaluates_on_a_split_and_online_dpo_still_refuses(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "rl"
    cfg = RLOOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(out),
                     reward_funcs=[f"{rewards_file}:short"], num_generations=2, max_completion_length=4,
                     per_device_train_batch_size=4, max_steps=1, save_steps=0, bf16=False, eval_split_size=2,
                     per_device_eval_batch_size=4)
    RLOOTrainer(cfg).train()
    (last,) = [r for r in read_metrics(out) if "eval_loss" in r]
    assert math.isfinite(last["eval_reward"]) and last["eval_completions/mean_length"] > 0
    from alignlab.algorithms.online_dpo import OnlineDPOConfig

    with pytest.raises(UserError, match="has no evaluation pass"):
        OnlineDPOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(out),
                        reward_funcs=[f"{rewards_file}:short"], eval_split_size=2)


def test_eval_batch_must_hold_whole_groups(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    cfg = _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "g", eval_split_size=2,
                per_device_eval_batch_size=6)
    with pytest.raises(UserError, match="per_device_eval_batch_size 6 counts eval completions"):
        GRPOTrainer(cfg)


def test_reward_model_name_or_path_loads_the_reward_model(tiny_model_dir, tiny_tokenizer, prompts_file, tmp_path):
    from alignlab.models import load_reward_model

    rm_dir = tmp_path / "rm"
    load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    out = tmp_path / "rmrun"
    cfg = _grpo(tiny_model_dir, prompts_file, None, out, reward_funcs=None, reward_model_name_or_path=str(rm_dir))
    assert cfg.reward_model_path == str(rm_dir)
    GRPOTrainer(cfg).train()
    assert math.isfinite(read_metrics(out)[0]["rewards/reward_model/mean"])
    with pytest.raises(UserError, match="name different reward models"):
        _grpo(tiny_model_dir, prompts_file, None, out, reward_funcs=None, reward_model_name_or_path=str(rm_dir),
              reward_model_path=str(tmp_path))


# --- reward spec forms ----------------------------------------------------------------------------------------
def test_dotted_reward_path_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "funcs.py").write_text("def count(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_pkg_rewards", raising=False)
    monkeypatch.delitem(sys.modules, "my_pkg_rewards.funcs", raising=False)
    fn = load_reward_func("my_pkg_rewards.funcs.count")
    assert fn(["p"], ["abc"]) == [3]
    with pytest.raises(UserError, match="has no 'nope'"):
        load_reward_func("my_pkg_rewards.funcs.nope")


def test_trl_builtin_reward_names():
    pytest.importorskip("trl")
    import trl.rewards

    assert load_reward_func("think_format_reward") is trl.rewards.think_format_reward
    assert load_reward_func("accuracy_reward") is trl.rewards.accuracy_reward
    overlong = load_reward_func("get_soft_overlong_punishment")  # TRL's script values: 1280 and 256
    assert overlong(completion_ids=[[1] * 1000, [1] * 1100, [1] * 1300]) == [0.0, pytest.approx(-76 / 256), -1.0]
    assert load_reward_func("trl.rewards.think_format_reward") is trl.rewards.think_format_reward


def test_trl_builtin_name_without_trl_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.rewards", None)  # import trl.rewards raises ImportError
    with pytest.raises(UserError, match="it needs trl installed") as info:
        load_reward_func("think_format_reward")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("not_a_reward", "expected path/to/file.py:function, module:function, package.module.function or one of TRL's"),
    ("rewards.py", "expected path/to/file.py:function"),
    ("no_such_pkg_xyz.mod.fn", "cannot import 'no_such_pkg_xyz.mod'"),
])
def test_bad_reward_specs_are_one_line(capsys, tiny_model_dir, prompts_file, tmp_path, spec, message):
    code, _, err = run_cli(capsys, "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(tmp_path / "o"), "--reward_funcs", spec)
    assert code != 0 and message in one_line(err)


# --- metrics --------------------------------------------------------------------------------------------------
def test_clip_ratio_metrics_by_hand():
    # two sequences, 4 tokens; the second has 3 real tokens. eps 0.2 / 0.28
    ratio = torch.tensor([[0.7, 1.0, 1.5, 0.9], [1.4, 1.5, 1.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    old, logps, advantages = torch.zeros(2, 4), ratio.log(), torch.tensor([-1.0, 2.0])
    # sequence 0 (A < 0): only low clips count, token 0 (0.7 < 0.8); sequence 1 (A > 0): all three (> 1.28)
    m = clip_ratio_metrics(logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 7)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(3 / 7)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(4 / 7)
    assert float(m["clip_ratio/low_min"]) == 0.0  # sequence 1 has no low clip
    assert float(m["clip_ratio/high_max"]) == 1.0  # every token of sequence 1
    # sequence level (GSPO): one weight per sequence, exp(mean log-ratio): 0.986 (not clipped) and 1.398 (high)
    seq = clip_ratio_metrics(logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28,
                             importance_sampling_level="sequence")
    assert math.exp(sum(map(math.log, (0.7, 1.0, 1.5, 0.9))) / 4) > 0.8
    assert math.exp(sum(map(math.log, (1.4, 1.5, 1.3))) / 3) > 1.28
    assert {k: float(v) for k, v in seq.items()} == {
        "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.5, "clip_ratio/region_mean": 0.5,
        "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 1.0}


def test_rloo_clip_ratio_min_and_max_by_hand():
    logps = torch.tensor([0.0, math.log(0.5), math.log(2.0)])
    [(_, m)] = rloo_policy_loss(logps, torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]), epsilon=0.2)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 3) and float(m["clip_ratio/low_min"]) == 0.0
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 3) and float(m["clip_ratio/high_max"]) == 1.0


def test_completion_length_statistics_by_hand():
    completions = Completions(ids=[[1, 2, 0], [1] * 5, [3, 0], [4] * 5], has_eos=[True, False, True, False],
                              prompt_index=[0, 0, 1, 1])
    scored = ScoredCompletions(examples=[{}] * 4, completions=completions, sequences={}, texts=[""] * 4,
                               scores=torch.zeros(4), per_source={}, generation_seconds=1.0, scoring_seconds=0.0)
    m = scored.metrics()
    assert float(m["completions/mean_length"].mean()) == 3.75
    assert (m["completions/min_length"], m["completions/max_length"]) == (2.0, 5.0)
    assert float(m["completions/clipped_ratio"].mean()) == 0.5
    assert (m["completions/mean_terminated_length"], m["completions/min_terminated_length"],
            m["completions/max_terminated_length"]) == (2.5, 2.0, 3.0)
    none = ScoredCompletions(examples=[{}], completions=Completions(ids=[[1, 1]], has_eos=[False], prompt_index=[0]),
                             sequences={}, texts=[""], scores=torch.zeros(1), per_source={}, generation_seconds=1.0,
                             scoring_seconds=0.0).metrics()
    assert none["completions/mean_terminated_length"] == 0.0  # TRL: zeros when no completion terminated


def test_grpo_and_rloo_write_trl_metric_names(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    names = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
             "clip_ratio/high_max", "entropy", "completions/mean_length", "completions/min_length",
             "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length",
             "completions/min_terminated_length", "completions/max_terminated_length")
    for name, trainer_cls, config_cls in (("g", GRPOTrainer, GRPOConfig), ("r", RLOOTrainer, RLOOConfig)):
        settings = dict(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(tmp_path / name),
                        reward_funcs=[f"{rewards_file}:short"], num_generations=4, max_completion_length=6,
                        per_device_train_batch_size=8, max_steps=1, save_steps=0, bf16=False, num_iterations=2)
        trainer = trainer_cls(config_cls(**settings))
        trainer.train()
        (row,) = read_metrics(tmp_path / name)
        assert all(math.isfinite(row[n]) for n in names) and "clip_ratio" not in row, name
        assert 0 < row["entropy"] <= math.log(trainer.policy.config.vocab_size)
        assert row["completions/min_length"] <= row["completions/mean_length"] <= row["completions/max_length"] <= 6


# --- entropy from the chunked head ----------------------------------------------------------------------------
def _full_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_head_entropy_matches_full_logits():
    from alignlab.ops.lm_head import head_label_logps

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16), torch.randn(1000, 16), torch.randn(1000)
    labels = torch.randint(0, 1000, (37,))
    # small blocks: many vocabulary and token blocks, so the running statistics are exercised
    logp, entropy, mean = head_label_logps(hidden, weight, bias, labels, temperature=0.7, with_entropy=True,
                                           chunk_elements=4096, with_mean_logits=True)
    full = torch.nn.functional.linear(hidden, weight, bias)
    assert torch.allclose(entropy.double(), _full_entropy(full, 0.7), atol=1e-5, rtol=0)
    assert torch.allclose(mean.double(), full.double().mean(-1) / 0.7, atol=1e-5, rtol=0)
    assert not mean.requires_grad
    assert torch.allclose(logp.double(), torch.log_softmax(full.double() / 0.7, -1).gather(1, labels[:, None])[:, 0],
                          atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunked", [True, False])
def test_completion_entropy_matches_a_plain_full_logits_computation(tiny_model_dir, monkeypatch, chunked):
    from transformers import AutoModelForCausalLM

    import alignlab.ops.logprobs as logprobs

    if not chunked:  # the plain path: logits of the completion positions, entropy from them
        monkeypatch.setattr(logprobs, "plain_head_reason", lambda model, head: "forced")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(5, 1000, (3, 9))
    attention_mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    completion_mask = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 4 + [0] * 2, [0] * 2 + [1] * 3 + [0] * 4])
    with torch.no_grad():
        _, _, stats = logprobs.completion_logps(model, input_ids, attention_mask, completion_mask, temperature=0.9,
                                                token_stats=("entropy", "mean_logits"))
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    scored = (completion_mask[:, 1:] * attention_mask[:, 1:]).bool()
    expected = torch.where(scored, _full_entropy(full, 0.9), 0.0)
    assert torch.allclose(stats["entropy"].double(), expected, atol=1e-5, rtol=0)
    assert bool((stats["entropy"][scored] > 0).all())
    mean = torch.where(scored, full.double().mean(-1) / 0.9, 0.0)
    assert torch.allclose(stats["mean_logits"].double(), mean, atol=1e-5, rtol=0)


# --- DPO: entropy and logits/chosen|rejected from the chunked head --------------------------------------------
def test_dpo_logs_entropy_and_mean_logits_against_full_logits(tiny_model_dir, pairs_file, tmp_path):
    from alignlab.algorithms.dpo import DPOConfig, DPOTrainer
    from alignlab.data.preference import collate_pairs
    from tests.conftest import tiny_config

    out = tmp_path / "dpo"
    trainer = DPOTrainer(tiny_config(DPOConfig, tiny_model_dir, pairs_file, out, max_steps=1))
    batch = collate_pairs(trainer.train_examples[:3], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        [(_, metrics)] = trainer.compute_loss(trainer.policy, batch)
        logits = trainer.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tokens = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
    per_token_mean = logits.double().mean(-1)
    assert float(metrics["logits/chosen"]) == pytest.approx(float(per_token_mean[:3][tokens[:3]].mean()), abs=1e-5)
    assert float(metrics["logits/rejected"]) == pytest.approx(float(per_token_mean[3:][tokens[3:]].mean()), abs=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(float(_full_entropy(logits, 1.0)[tokens].mean()), abs=1e-5)
    trainer.train()
    row = next(r for r in read_metrics(out) if "loss" in r)
    assert all(math.isfinite(row[n]) for n in ("entropy", "logits/chosen", "logits/rejected"))


def test_sft_logs_entropy_against_full_logits(tiny_model_dir, tmp_path):
    from alignlab.algorithms.sft import SFTConfig, SFTTrainer
    from alignlab.data.sft import collate_sft
    from tests.conftest import tiny_config

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "completion": " 1 2 3"}) + "\n" for i in range(8)))
    trainer = SFTTrainer(tiny_config(SFTConfig, tiny_model_dir, data, tmp_path / "sft", max_steps=1))
    batch = collate_sft(trainer.train_examples[:3], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        [(_, metrics)] = trainer.compute_loss(trainer.model, batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
    assert float(metrics["entropy"]) == pytest.approx(float(_full_entropy(logits, 1.0)[targets].mean()), abs=1e-5)


def test_kto_logs_entropy_and_mean_logits_against_full_logits(tiny_model_dir, tmp_path):
    from alignlab.algorithms.kto import KTOConfig, KTOTrainer
    from alignlab.data.unpaired import collate_unpaired

    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}.",
                                        "label": bool(i % 3)}) + "\n" for i in range(9)))
    out = tmp_path / "kto"
    trainer = KTOTrainer(KTOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(data), output_dir=str(out),
                                   per_device_train_batch_size=4, max_steps=1, save_steps=0, bf16=False))
    pad = trainer.tokenizer.pad_token_id
    desirable = [e for e in trainer.train_examples if e["label"]]
    for examples in (trainer.train_examples[:4], desirable[:3]):  # the second: no undesirable row
        batch = collate_unpaired(examples, pad, max_length=trainer.config.max_length)
        with torch.no_grad():
            [(_, metrics)] = trainer.compute_loss(trainer.policy, batch)
            logits = trainer.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        tokens = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
        means = logits.double().mean(-1)
        label = batch["label"][:, None]
        assert float(metrics["entropy"]) == pytest.approx(float(_full_entropy(logits, 1.0)[tokens].mean()), abs=1e-5)
        assert float(metrics["logits/chosen"]) == pytest.approx(float(means[tokens & label].mean()), abs=1e-5)
        if (~batch["label"]).any():
            assert float(metrics["logits/rejected"]) == pytest.approx(float(means[tokens & ~label].mean()), abs=1e-5)
        else:
            assert "logits/rejected" not in metrics  # TRL's KTO logs none for a micro-batch without such rows


def test_the_command_line_takes_the_trl_flags(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path,
                                              monkeypatch):
    pytest.importorskip("trl")
    package = tmp_path / "cli_pkg_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("from .funcs import *\n")
    (package / "funcs.py").write_text("def shorter(prompts, completions, **kw):\n"
                                      "    return [-float(len(c[0]['content'])) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_pkg_rewards", raising=False)
    monkeypatch.delitem(sys.modules, "cli_pkg_rewards.funcs", raising=False)
    out = tmp_path / "cli"
    code, _, err = run_cli(
        capsys, "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
        "--output_dir", str(out), "--reward_funcs", "cli_pkg_rewards.funcs.shorter", "think_format_reward",
        "--num_generations", "2", "--per_device_train_batch_size", "2", "--steps_per_generation", "2",
        "--max_completion_length", "4", "--top_k", "50", "--min_p", "0.01", "--repetition_penalty", "1.1",
        "--mask_truncated_completions", "--log_completions", "--eval_split_size", "2", "--per_device_eval_batch_size",
        "2", "--max_steps", "1", "--save_steps", "0", "--bf16", "false")
    assert code == 0, err
    rows = read_metrics(out)
    assert {"rewards/shorter/mean", "rewards/think_format_reward/mean", "entropy"} <= set(rows[0])
    assert "eval_reward" in rows[-1]


def test_reward_functions_are_called_by_keyword_as_trl_calls_them():
    from alignlab.rollout.rewards import call_reward_func

    def completions_first(completions, solution, **kwargs):  # TRL's accuracy_reward's signature
        return [float(c == s) for c, s in zip(completions, solution)]

    assert call_reward_func(completions_first, "f", ["p", "q"], ["a", "b"], solution=["a", "c"],
                            completion_ids=[[1], [2]]).tolist() == [1.0, 0.0]
    ids_only = lambda completion_ids, **kw: [float(len(i)) for i in completion_ids]  # noqa: E731
    assert call_reward_func(ids_only, "f", ["p"], ["a"], completion_ids=[[1, 2]]).tolist() == [2.0]
    positional = lambda p, c, **k: [float(len(c[0]))]  # noqa: E731 - other names: positionally
    assert call_reward_func(positional, "f", ["p"], ["abc"], completion_ids=[[1]]).tolist() == [3.0]
    with pytest.raises(UserError, match="missing 1 required positional argument: 'solution'"):
        call_reward_func(completions_first, "f", ["p"], ["a"], completion_ids=[[1]])


def test_a_step_whose_completions_are_all_truncated_has_a_finite_zero_loss(tiny_model_dir, prompts_file,
                                                                           rewards_file, tmp_path):
    out = tmp_path / "all"
    # the tiny random model never draws EOS in 3 tokens: every completion is truncated and masked out
    GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, out, max_completion_length=3,
                      mask_truncated_completions=True)).train()
    (row,) = read_metrics(out)
    assert row["completions/clipped_ratio"] == 1.0
    assert row["loss"] == 0.0 and row["nonfinite_steps"] == 0


def test_generation_kwargs_override_the_sampling_flags(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """TRL's generation_kwargs: its keys win over the flags of the same name when sampling; others are refused."""
    trainer = GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", temperature=1.5,
                                generation_kwargs='{"top_k": 1}'))
    assert trainer.config.generation_kwargs == {"top_k": 1} and trainer.config.top_k == 0
    torch.manual_seed(0)
    sampled = _sample(trainer, num_generations=4).completions.ids
    greedy = _sample(trainer, do_sample=False).completions.ids
    assert sampled == [g for g in greedy for _ in range(4)]
    for bad, message in (({"num_beams": 4}, "num_beams not supported here"), ({"top_p": 2.0}, "top_p")):
        with pytest.raises(UserError, match=message):
            _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "x", generation_kwargs=bad)


def test_chat_template_kwargs_reach_the_prompt_template(tiny_model_dir, rewards_file, tmp_path):
    """TRL's chat_template_kwargs: extra apply_chat_template arguments (template variables) render the prompts."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if think %} THINK{% endif %}")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Hi {i}"}]}) + "\n" for i in range(4)))
    kw = dict(chat_template_path=str(template), per_device_train_batch_size=4, gradient_accumulation_steps=1)
    plain = GRPOTrainer(_grpo(tiny_model_dir, data, rewards_file, tmp_path / "a", **kw))
    think = GRPOTrainer(_grpo(tiny_model_dir, data, rewards_file, tmp_path / "b", chat_template_kwargs={"think": True},
                              **kw))
    assert plain.tokenizer.decode(plain.prompts[0]["prompt_ids"]) == "Hi 0"
    assert think.tokenizer.decode(think.prompts[0]["prompt_ids"]) == "Hi 0 THINK"


def test_num_generations_eval_sets_the_eval_group(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """TRL's num_generations_eval: each eval prompt gets that many completions (the training group stays 4)."""
    trainer = GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "g", eval_split_size=2,
                                per_device_eval_batch_size=4, num_generations_eval=2))
    assert trainer.loop_inputs()["eval_batch_size"] == 2  # prompts per eval batch: 4 completions / 2
    with torch.no_grad():
        data, metrics = trainer.eval_rollout(trainer.policy, trainer.setup.eval_prompts[:2])
    assert data["response_mask"].shape[0] == 4 and math.isfinite(float(metrics["reward"]))
    # group-relative advantages over pairs: each pair's two advantages sum to 0
    assert data["advantages"].view(2, 2).sum(1).abs().max() < 1e-5
    with pytest.raises(UserError, match="multiple of the 2 completions"):
        GRPOTrainer(_grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "h", eval_split_size=2,
                          per_device_eval_batch_size=3, num_generations_eval=2))
    from alignlab.algorithms.online_dpo import OnlineDPOConfig

    with pytest.raises(UserError, match="num_generations_eval"):
        OnlineDPOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(tmp_path),
                        reward_funcs=[f"{rewards_file}:short"], num_generations_eval=2)


def test_cache_implementation_picks_the_engine_with_that_kv_cache(tiny_model_dir, prompts_file, rewards_file,
                                                                  tmp_path):
    """TRL's cache_implementation (the KV cache of transformers' generate): dynamic is the generate engine, static
    the static-cache one; a clash with --generation_backend and other caches are one-line errors."""
    from alignlab.rollout.engines import engine_for
    from alignlab.rollout.engines.hf_generate import StaticEngine

    cfg = _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "s", cache_implementation="static")
    assert cfg.generation_backend == "static"
    assert _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "d",
                 cache_implementation="dynamic").generation_backend == "generate"
    trainer = GRPOTrainer(cfg)
    assert isinstance(engine_for(trainer.policy, trainer.config.generation_backend), StaticEngine)
    with pytest.raises(UserError, match="samples with --generation_backend static, not paged"):
        _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "x", cache_implementation="static",
              generation_backend="paged")
    with pytest.raises(UserError, match="offer dynamic"):
        _grpo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "y", cache_implementation="offloaded")
