"""The one policy-gradient rollout (``algorithms/online.py``, ``PolicyGradientAlgorithm``): every method module
leaves the rollout, precision and distribution to it; the shuffle generator is the checkpointed one for every
method; an estimator that declares ``needs_greedy_baseline`` gets the scores of each prompt's greedy completion,
and a prompt whose greedy completion cannot be scored leaves the step with its group."""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import pkgutil

import pytest
import torch

import alignlab.algorithms
from alignlab.advantages.registry import AdvantageInputs
from alignlab.algorithms.online import GeneratorState, PolicyGradientAlgorithm
from alignlab.algorithms.rloo import RLOOConfig, RLOOTrainer

# what a method module must not reach for itself: precision and distribution go through OnlineSetup
FORBIDDEN_MODULES = ("alignlab.train.distributed", "alignlab.ops.cpu_kernels", "alignlab.ops.memory")
FORBIDDEN_NAMES = {("alignlab.train.loop", "autocast"), ("torch", "autocast")}


def _method_classes() -> list[type]:
    for info in pkgutil.iter_modules(alignlab.algorithms.__path__):
        importlib.import_module(f"alignlab.algorithms.{info.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return sorted({c for c in subclasses(PolicyGradientAlgorithm) if c.__module__.startswith("alignlab.")},
                  key=lambda c: c.__name__)


def test_every_policy_gradient_method_uses_the_one_rollout_and_no_precision_or_distribution_layer():
    classes = _method_classes()
    names = {c.__name__ for c in classes}
    assert {"GRPOTrainer", "RLOOTrainer", "ReinforcePPTrainer", "PPOTrainer"} <= names
    for cls in classes:
        assert "rollout" not in vars(cls) and "_updates" not in vars(cls), cls  # one rollout loop
        source = inspect.getsource(inspect.getmodule(cls))
        assert "randperm" not in source and "torch.autocast" not in source, cls
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in FORBIDDEN_MODULES, (cls, node.module)
                assert not {(node.module, a.name) for a in node.names} & FORBIDDEN_NAMES, (cls, node.module)
            elif isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & set(FORBIDDEN_MODULES), cls


def _rloo(model, data, rewards, out, **kw):
    return RLOOConfig(**{"model_name_or_path": model, "dataset_name": str(data), "output_dir": str(out),
                         "reward_funcs": [f"{rewards}:short"], "num_generations": 2, "max_completion_length": 6,
                         "per_device_train_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3, "save_steps": 0,
                         "bf16": False, "beta": 0.0, "sample_steps": 1, **kw})


def test_the_shuffle_generator_is_saved_in_checkpoints(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    # RLOO and REINFORCE++ shuffled with a plain generator before: a resumed run reshuffled from the seed
    trainer = RLOOTrainer(_rloo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r"))
    registered = [o for o in trainer.accelerator._custom_objects if isinstance(o, GeneratorState)]
    assert [o.generator for o in registered] == [trainer.shuffle]
    assert torch.equal(trainer.shuffle.get_state(), torch.Generator().manual_seed(trainer.config.seed).get_state())


class _GreedyBaselineTrainer(RLOOTrainer):
    """RLOO's set-up with an estimator that declares a greedy baseline and records what it was given."""

    seen: list[AdvantageInputs]

    def advantage_estimator(self):
        seen = self.seen = []

        def estimator(inputs: AdvantageInputs):
            seen.append(inputs)
            baseline = inputs.baseline_scores.repeat_interleave(inputs.num_generations)
            return inputs.scores - baseline, {"baseline_reward": inputs.baseline_scores.mean()}

        estimator.needs_greedy_baseline = True
        return estimator, {}


def test_a_greedy_baseline_estimator_gets_the_greedy_completions_scores(tiny_model_dir, prompts_file, rewards_file,
                                                                        tmp_path):
    trainer = _GreedyBaselineTrainer(_rloo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "g"))
    examples = trainer.prompts[:2]
    with torch.no_grad():
        greedy = trainer.setup.sample(trainer.policy, examples, max_new_tokens=6, do_sample=False)
        again = trainer.setup.sample(trainer.policy, examples, max_new_tokens=6, do_sample=False)
        rollout = trainer.rollout(trainer.policy, examples, 1)
    assert greedy.texts == again.texts  # greedy: no randomness
    (inputs,) = trainer.seen
    assert inputs.baseline_scores.tolist() == greedy.scores.tolist()  # (P,): one per prompt
    assert float(rollout.metrics["baseline_reward"]) == pytest.approx(float(greedy.scores.mean()))
    assert rollout.metrics["time/baseline"] > 0
    rows = rollout.samples
    assert len(rows) == 4
    for i, row in enumerate(rows):  # each completion against its own prompt's greedy score
        assert row["baseline_score"] == pytest.approx(float(greedy.scores[i // 2]))
        assert row["advantage"] == pytest.approx(row["score"] - row["baseline_score"], abs=1e-6)


def test_a_prompt_whose_greedy_completion_has_no_score_leaves_with_its_group(tiny_model_dir, prompts_file,
                                                                             rewards_file, tmp_path):
    trainer = _GreedyBaselineTrainer(_rloo(tiny_model_dir, prompts_file, rewards_file, tmp_path / "d",
                                           reward_func_errors="drop"))
    sample = trainer.setup.sample

    def failing_greedy(policy, examples, **kw):  # the reward function fails on prompt 0's greedy completion
        scored = sample(policy, examples, **kw)
        if kw.get("do_sample", True):
            return scored
        scored.scores[0] = math.nan
        return scored.without_bad_rewards(1)

    trainer.setup.sample = failing_greedy
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    (inputs,) = trainer.seen
    assert inputs.scores.shape == (2,) and inputs.baseline_scores.shape == (1,)  # prompt 1's group only
    assert rollout.metrics["rewards/dropped"] == 2.0
    assert sum(len(mb["advantages"]) for mb in rollout.updates[0]) == 2
    assert {row["prompt"] == trainer.prompts[1]["prompt"] for row in rollout.samples} == {True}
