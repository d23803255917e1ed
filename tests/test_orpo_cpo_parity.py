"""Parity of alignlab's reference-free preference losses (``orpo``, ``cpo``, ``simpo``) with TRL 1.16's
experimental ``ORPOTrainer`` and ``CPOTrainer`` (``loss_type="sigmoid"`` and ``"simpo"``; TRL is a test-only
dependency).

alignlab trains them with its DPO command (``loss_type="orpo"`` / ``"cpo"`` / ``["simpo", "sft"]``, no
reference model); the settings are those of tests/test_dpo_parity.py (its helpers: the same model and 4
explicit-prompt rows, fp32, one batch, one AdamW step at a constant learning rate, clipping at 1.0, dropout off).
Two differences of definition are matched by the data, not by changing either library:

* TRL's experimental trainers put the tokenizer's BOS token in front of every prompt (SmolLM2's is
  ``<|im_start|>``); alignlab, like TRL's ``DPOTrainer``, adds nothing. Every prompt here starts with that
  token's text, so both score the same token sequences (TRL adds no second one).
* TRL's ORPO NLL covers the prompt tokens as well as the chosen completion's; alignlab's covers the chosen
  completion only (docs/losses.md, "orpo"). The ORPO run therefore uses the BOS token as the whole prompt and
  the HH-RLHF prompt as the start of both completions: the first token is never predicted, so both NLLs are
  the mean over the same tokens and the whole loss is comparable.

Per method: ``logps/chosen``, ``logps/rejected`` and ``loss`` at step 1 to 1e-3 relative (per-token means for
ORPO and SimPO, sums for CPO, in both libraries); ``loss``, its change from step 1 and ``rewards/margins`` at
step 2, after one update, to 2e-2 relative. The weights are chosen so that each term matters: ORPO's
``beta`` (its lambda) is 1.0 rather than TRL's 0.1, which would leave the odds-ratio term a twentieth of the
NLL's gradient; CPO's NLL weight ``cpo_alpha`` is 1.5 and SimPO's 0.5 (CPO-SimPO, alignlab's
``["simpo", "sft"]`` with weights ``[1, cpo_alpha]``), with ``label_smoothing`` 0.1 and SimPO's beta 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_dpo_parity import (
    LEARNING_RATE, MAX_LENGTH, SEED, SHARED_DATA, _explicit_rows, _run_alignlab, _two_step_failures, _two_step_report,
)

pytestmark = pytest.mark.integration

BOS = "<|im_start|>"

# method -> (TRL trainer, TRL config overrides, alignlab loss settings)
METHODS = {
    "orpo": ("orpo", {"beta": 1.0}, {"loss_type": ["orpo"], "beta": 1.0}),
    "cpo": ("cpo", {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.5},
            {"loss_type": ["cpo"], "beta": 0.1, "cpo_alpha": 1.5}),
    "simpo": ("cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.5, "label_smoothing": 0.1},
              {"loss_type": ["simpo", "sft"], "loss_weights": [1.0, 0.5], "beta": 2.0, "simpo_gamma": 0.5,
               "label_smoothing": 0.1}),
}


def _rows_for(method: str, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    if method == "orpo":  # the whole prompt is BOS: both NLLs cover exactly the completion tokens
        return [{"prompt": BOS, "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in rows]
    return [{**r, "prompt": BOS + r["prompt"]} for r in rows]


def _run_trl(trainer: str, model_path: str, rows: list[dict[str, str]], output_dir: Path,
             overrides: dict) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

    args = Config(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=len(rows), gradient_accumulation_steps=1, max_steps=2, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, max_length=MAX_LENGTH, seed=SEED,
        disable_dropout=True, model_init_kwargs={"dtype": torch.float32, "device_map": None},
        dataloader_num_workers=0, remove_unused_columns=False, **overrides,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trl_trainer = Trainer(model=model_path, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    assert trl_trainer.model.dtype == torch.float32 and trl_trainer.args.device.type == "cpu"
    first = trl_trainer.train_dataset[0]
    assert first["prompt_input_ids"].count(tokenizer.bos_token_id) == 1, "TRL added a second BOS token"
    trl_trainer.train()
    return [entry for entry in trl_trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def base_rows():
    pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    pytest.importorskip("trl.experimental.cpo", reason="this trl has no experimental CPOTrainer")
    if not SHARED_DATA.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from transformers import AutoTokenizer

    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    return model_path, _explicit_rows(AutoTokenizer.from_pretrained(model_path))


@pytest.mark.parametrize("method", list(METHODS))
def test_reference_free_loss_matches_trl_first_two_steps(method, base_rows, tmp_path):
    model_path, rows = base_rows
    trainer, trl_overrides, loss_args = METHODS[method]
    rows = _rows_for(method, rows)
    data_path = tmp_path / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    ours = _run_alignlab(model_path, data_path, tmp_path / "alignlab", loss_args)
    theirs = _run_trl(trainer, model_path, rows, tmp_path / "trl", trl_overrides)
    report, ours_change, theirs_change = _two_step_report(ours, theirs)
    report += f"; trl nll_loss {[t.get('nll_loss') for t in theirs[:2]]}"
    print(f"{method}: {loss_args}\n{report}")

    # Step 2 must differ visibly from step 1, or it would not test the update at all.
    assert abs(theirs_change) > 1e-3 * abs(theirs[0]["loss"]), f"step 2 loss barely moved:\n{report}"
    assert abs(theirs[1]["rewards/margins"] - theirs[0]["rewards/margins"]) > 1e-4, f"margin did not move:\n{report}"

    failures = _two_step_failures(ours, theirs, ours_change, theirs_change)
    assert not failures, f"{method}: " + "\n".join(failures) + "\nall values:\n" + report
