"""Parity of alignlab's GRPO losses with TRL's ``GRPOTrainer`` (TRL 1.16, a test-only dependency), on the same
sampled completions.

As tests/test_rloo_parity.py: sampling cannot be matched, so alignlab samples once (2 chat prompts of the same
token length x 2 completions of up to 12 tokens, of several lengths, from the embedded SmolLM2-135M-Instruct,
fp32, temperature 1) and
both libraries get the same completions, the same advantages (alignlab's group advantages of made-up rewards;
their parity with TRL is tests/test_advantages_group.py's) and the same old log-probs: the current ones moved
by a fixed per-token shift plus a per-sequence offset, so that ratios fall on both sides of every clip bound,
per token and per sequence. The models are loaded once (module-scoped fixtures); every case builds a TRL
``GRPOTrainer`` around the same TRL model, and sets alignlab's trainer's config, so no case reloads weights.

Compared:

* the per-token log-probs of alignlab's ``OnlineSetup.logps`` and TRL's ``_get_per_token_logps_and_entropies``
  (their per-completion sums to 1e-3 relative, every token to 1e-3 relative + 1e-5 nats);
* per ``loss_type`` (TRL's names; ``dapo`` is TRL's default, ``gspo`` is ``grpo`` with
  ``importance_sampling_level="sequence"``, ``grpo_kl`` adds the k3 KL with ``beta`` 0.04 against made-up
  reference log-probs, times the importance weight as TRL 1.16 does by default, ``use_bias_correction_kl``):
  the loss of alignlab's ``GRPOTrainer.compute_loss`` and TRL's ``_compute_loss`` on one batch, and the norm
  of its gradient over all parameters, to 1e-3 relative; the clip fraction (TRL's ``clip_ratio/region_mean``,
  or ``cispo_clip_ratio``) exactly, and the KL to 1e-3.

This test found that alignlab lacked ``use_bias_correction_kl`` (its KL term was TRL's with the option off:
the logged KL differed by 7% on these off-policy ratios and the gradient norm by 1e-3); alignlab now has the
option, on by default as TRL (tests/test_losses_ppo.py and tests/test_grpo_smoke.py test it without TRL's
trainer loop).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.test_rloo_parity import _trl_inputs

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 12
RTOL = 1e-3
PROMPTS = [[{"role": "user", "content": f"In one or two words, what colour is the {thing}?"}]
           for thing in ("sky", "grass")]
CLIP = {"epsilon": 0.2, "epsilon_high": 0.28}  # asymmetric (DAPO's clip-higher), so both bounds are tested
CASES = {
    "dapo": {"loss_type": "dapo", **CLIP},
    "grpo": {"loss_type": "grpo", **CLIP},
    "bnpo": {"loss_type": "bnpo", **CLIP},
    "dr_grpo": {"loss_type": "dr_grpo", **CLIP},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},  # a bound on the ratio itself
    "sapo": {"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", **CLIP},
    "grpo_kl": {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": True, **CLIP},  # TRL's default
}
CLIP_METRIC = {"cispo": "cispo_clip_ratio", "sapo": None}  # the others: clip_ratio/region_mean


def _grad_norm(model) -> float:
    import torch

    return float(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm())


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """alignlab's trainer and batch, the TRL model and the TRL-shaped inputs, built once."""
    pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    import torch
    from transformers import AutoModelForCausalLM

    from alignlab.advantages.group import group_advantages
    from alignlab.algorithms.grpo import GRPOConfig, GRPOTrainer
    from alignlab.models import embedded_model_path

    tmp = tmp_path_factory.mktemp("grpo")
    model_path = str(embedded_model_path())
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp / "rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    config = GRPOConfig(
        model_name_or_path=model_path, dataset_name=str(tmp / "prompts.jsonl"), output_dir=str(tmp / "a"),
        reward_funcs=[f"{tmp / 'rewards.py'}:length"], per_device_train_batch_size=4, num_generations=2,
        max_completion_length=MAX_NEW_TOKENS, beta=0.0, bf16=False, seed=0, padding_free=True)
    ours = GRPOTrainer(config)
    examples = ours.prompts
    assert len({len(e["prompt_ids"]) for e in examples}) == 1, "the prompts must tokenize to the same length"
    for seed in range(4):  # the first draw whose completions have several lengths (padding and masks matter)
        torch.manual_seed(seed)
        with torch.no_grad():
            scored = ours.setup.sample(ours.policy, examples, max_new_tokens=MAX_NEW_TOKENS, num_generations=2)
        lengths = scored.completions.lengths
        if min(lengths) >= 2 and len(set(lengths)) > 1:
            break
    assert min(lengths) >= 2 and len(set(lengths)) > 1, f"completions of lengths {lengths}: want several lengths"
    batch = dict(scored.sequences)
    with torch.no_grad():
        ours_logps = ours.setup.logps(ours.policy, batch)

    prompt_ids, completion_ids, mask = _trl_inputs(scored, ours.tokenizer.pad_token_id)
    width = completion_ids.shape[1]
    ours_logps = ours_logps[:, :width]

    advantages, _ = group_advantages(torch.tensor([1.0, 3.0, 2.0, -0.5]), 2)
    # old = current - shift: per-token ratios exp(shift) on both sides of 1 -/+ eps and of cispo's 1.3, and
    # per-sequence offsets so that GSPO's sequence ratios (exp of the mean shift) differ too
    pattern = torch.tensor([0.5, -0.5, 0.1, -0.1, 0.35, -0.3, 0.0, 0.2, -0.2, 0.45, -0.45, 0.05])[:width]
    offsets = torch.tensor([0.3, -0.3, 0.25, -0.25]).unsqueeze(1)
    shift = torch.where(mask.bool(), pattern + offsets, 0.0)
    old_logps = torch.where(mask.bool(), ours_logps - shift, 0.0)
    ref_logps = torch.where(mask.bool(), ours_logps + 0.5 * pattern.flip(0), 0.0)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return {
        "ours": ours, "config": config, "batch": batch, "ours_logps": ours_logps, "model": model,
        "model_path": model_path, "prompt_ids": prompt_ids, "completion_ids": completion_ids, "mask": mask,
        "advantages": advantages, "old_logps": old_logps, "ref_logps": ref_logps, "width": width,
    }


def _trl_trainer(shared, **overrides):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    args = TRLGRPOConfig(output_dir=str(shared["config"].output_dir) + "-trl", use_cpu=True, bf16=False, fp16=False,
                         per_device_train_batch_size=4, num_generations=2, max_completion_length=MAX_NEW_TOKENS,
                         temperature=1.0, report_to="none", **{"beta": 0.0, **overrides})
    trainer = TRLGRPOTrainer(model=shared["model"], reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                             args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    assert trainer.model is shared["model"] and trainer.model.dtype == torch.float32
    assert trainer.args.steps_per_generation == 1 and trainer.accelerator.num_processes == 1
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which is not run here
    return trainer


def test_grpo_logps_match_trl(shared):
    import torch

    trainer = _trl_trainer(shared)
    with torch.no_grad():
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            shared["model"], torch.cat([shared["prompt_ids"], shared["completion_ids"]], 1),
            torch.cat([torch.ones_like(shared["prompt_ids"]), shared["mask"]], 1), shared["width"])
    mask = shared["mask"].bool()
    ours, theirs = torch.where(mask, shared["ours_logps"], 0.0), torch.where(mask, trl_logps, 0.0)
    print("logps alignlab", ours.sum(1).tolist(), "trl", theirs.sum(1).tolist())
    assert torch.allclose(ours.sum(1), theirs.sum(1), rtol=RTOL, atol=0), (ours.sum(1), theirs.sum(1))
    assert torch.allclose(ours, theirs, rtol=RTOL, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_loss_and_gradient_match_trl(case, shared):
    import torch

    settings = CASES[case]
    ours, model, mask = shared["ours"], shared["model"], shared["mask"]
    ours.config = dataclasses.replace(shared["config"], **settings)  # compute_loss reads only the config
    trainer = _trl_trainer(shared, **settings)

    batch = {**shared["batch"], "advantages": shared["advantages"], "num_items_in_batch": mask.sum().float()}
    old = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
    old[:, : shared["width"]] = shared["old_logps"]
    batch["old_logps"] = old
    if settings.get("beta"):
        ref = torch.zeros_like(old)
        ref[:, : shared["width"]] = shared["ref_logps"]
        batch["ref_logps"] = ref
    ours.policy.zero_grad()
    ((ours_loss, ours_metrics),) = ours.compute_loss(ours.policy, batch)
    ours_loss.backward()
    ours_grad = _grad_norm(ours.policy)

    inputs = {"prompt_ids": shared["prompt_ids"], "prompt_mask": torch.ones_like(shared["prompt_ids"]),
              "completion_ids": shared["completion_ids"], "completion_mask": mask,
              "old_per_token_logps": shared["old_logps"], "advantages": shared["advantages"],
              "num_items_in_batch": mask.sum().float()}
    if settings.get("beta"):
        inputs["ref_per_token_logps"] = shared["ref_logps"]
    model.train()
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grad = _grad_norm(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    print(case, "loss alignlab", float(ours_loss.detach()), "trl", float(trl_loss.detach()),
          "grad norm", ours_grad, trl_grad,
          "metrics alignlab", {k: float(v) for k, v in ours_metrics.items()}, "trl", trl_metrics)

    assert float(ours_loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=RTOL)
    assert ours_grad == pytest.approx(trl_grad, rel=RTOL)
    clip_key = CLIP_METRIC.get(case, "clip_ratio/region_mean")
    if clip_key is not None:
        assert 0 < trl_metrics[clip_key] < 1, f"{case}: the clip must be taken on some, not all, tokens"
        for key in [clip_key] + (["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/low_min",
                                  "clip_ratio/high_max"] if clip_key == "clip_ratio/region_mean" else []):
            assert float(ours_metrics[key]) == pytest.approx(trl_metrics[key], abs=1e-6), key
    assert float(ours_metrics["entropy"]) == pytest.approx(trl_metrics["entropy"], rel=RTOL)
    if settings.get("beta"):
        assert float(ours_metrics["kl"]) == pytest.approx(trl_metrics["kl"], rel=RTOL)
