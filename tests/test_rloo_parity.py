"""Parity of alignlab's RLOO with TRL's ``RLOOTrainer`` (TRL 1.16, a test-only dependency), on the same sampled
completions.

Sampling cannot be matched (the two use different samplers), so alignlab samples once and both are given the same
completions: 2 prompts of the same token length (no left padding for TRL) x 2 completions of up to 12 tokens
from the embedded SmolLM2-135M-Instruct, fp32, temperature 1. Compared:

* the per-completion log-probs (summed over completion tokens) of alignlab's ``OnlineSetup.logps`` and TRL's
  ``_get_per_token_logps_and_entropies``: 1e-3 relative;
* the loss of alignlab's ``RLOOTrainer.compute_loss`` and TRL's ``_compute_loss`` on one batch, with the
  same advantages (alignlab's leave-one-out advantages of made-up rewards, checked against TRL's formula in
  tests/test_advantages_rloo.py) and old log-probs moved off the current ones so that both clip branches are
  taken: 1e-3 relative, and the clip fraction exactly;
* the gradient norm of that loss over all parameters: 1e-3 relative (the loss's gradient, not only its value).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 12
RTOL = 1e-3


def _grad_norm(model) -> float:
    import torch

    return float(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm())


def _trl_inputs(scored, pad_token_id: int):
    """alignlab's sampled completions as TRL's trainers take them: ``prompt_ids`` ``(N, P)`` (prompts of one
    length), ``completion_ids`` ``(N, W)`` right-padded with ``pad_token_id`` to the longest completion ``W``,
    and the completion mask ``(N, W)``."""
    import torch

    prompt_ids = torch.tensor([ex["prompt_ids"] for ex in scored.examples])
    width = max(scored.completions.lengths)
    completion_ids = torch.full((len(scored.texts), width), pad_token_id)
    for i, ids in enumerate(scored.completions.ids):
        completion_ids[i, : len(ids)] = torch.tensor(ids)
    return prompt_ids, completion_ids, scored.sequences["response_mask"][:, :width].cpu()


def test_rloo_loss_and_logps_match_trl_on_the_same_completions(tmp_path):
    pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    import torch
    from datasets import Dataset
    from trl import RLOOConfig as TRLRLOOConfig
    from trl import RLOOTrainer as TRLRLOOTrainer

    from alignlab.advantages.rloo import rloo_advantages
    from alignlab.algorithms.rloo import RLOOConfig, RLOOTrainer
    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    prompts = ["Tell me a story about a cat.", "Tell me a story about a dog."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "rewards.py").write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    ours = RLOOTrainer(RLOOConfig(
        model_name_or_path=model_path, dataset_name=str(tmp_path / "prompts.jsonl"), output_dir=str(tmp_path / "a"),
        reward_funcs=[f"{tmp_path / 'rewards.py'}:length"], per_device_train_batch_size=4, num_generations=2,
        max_completion_length=MAX_NEW_TOKENS, beta=0.0, bf16=False, seed=0, padding_free=True))
    examples = ours.prompts
    assert len({len(e["prompt_ids"]) for e in examples}) == 1, "the prompts must tokenize to the same length"
    torch.manual_seed(0)
    with torch.no_grad():
        scored = ours.setup.sample(ours.policy, examples, max_new_tokens=MAX_NEW_TOKENS, num_generations=2)
    batch = dict(scored.sequences)

    trl = TRLRLOOTrainer(
        model=model_path, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=TRLRLOOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, fp16=False,
                           per_device_train_batch_size=4, num_generations=2, max_completion_length=MAX_NEW_TOKENS,
                           beta=0.0, temperature=1.0, report_to="none", model_init_kwargs={"dtype": torch.float32}),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
    )
    model = trl.model
    assert model.dtype == torch.float32
    prompt_ids, completion_ids, completion_mask = _trl_inputs(scored, ours.tokenizer.pad_token_id)
    width = completion_ids.shape[1]

    # 1. summed completion log-probs
    with torch.no_grad():
        ours_logps = ours.setup.logps(ours.policy, batch).sum(-1)
        trl_tokens, _, _ = trl._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), completion_mask], 1), width)
        trl_logps = (trl_tokens * completion_mask).sum(1)
    print("logps alignlab", ours_logps.tolist(), "trl", trl_logps.tolist())
    assert torch.allclose(ours_logps, trl_logps, rtol=RTOL, atol=0), (ours_logps, trl_logps)

    # 2. the loss on one batch, both clip branches taken, and 3. its gradient
    advantages, _ = rloo_advantages(torch.tensor([1.0, 3.0, -2.0, 0.5]), 2)
    # advantages -2, 2, -2.5, 2.5; ratios e^-0.5 (A < 0: clipped low), e^-0.1 (inside), e^-0.5 (clipped low),
    # e^0.5 (A > 0: clipped high)
    shift = torch.tensor([-0.5, -0.1, -0.5, 0.5])
    old_sums = ours_logps - shift
    old_tokens = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
    old_tokens[:, 0] = old_sums  # the loss reads the sum over tokens only
    ours.policy.zero_grad()
    ((ours_loss, ours_metrics),) = ours.compute_loss(ours.policy, {**batch, "advantages": advantages,
                                                                    "old_logps": old_tokens})
    ours_loss.backward()
    model.train()
    model.zero_grad()
    trl_loss = trl._compute_loss(model, {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
                                         "completion_ids": completion_ids, "completion_mask": completion_mask,
                                         "old_logps": old_sums, "advantages": advantages})
    trl_loss.backward()
    print("loss alignlab", float(ours_loss.detach()), "trl", float(trl_loss.detach()), "grad norm", _grad_norm(ours.policy),
          _grad_norm(model))
    assert float(ours_loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=RTOL)
    assert advantages.tolist() == [-2.0, 2.0, -2.5, 2.5]
    assert float(ours_metrics["clip_ratio/region_mean"]) == trl._metrics["train"]["clip_ratio/region_mean"][-1] == 0.75
    assert float(ours_metrics["clip_ratio/high_mean"]) == trl._metrics["train"]["clip_ratio/high_mean"][-1] == 0.25
    for key in ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_max"):
        assert float(ours_metrics[key]) == trl._metrics["train"][key][-1], key
    assert float(ours_metrics["entropy"]) == pytest.approx(trl._metrics["train"]["entropy"][-1], rel=RTOL)
    assert _grad_norm(ours.policy) == pytest.approx(_grad_norm(model), rel=RTOL)
