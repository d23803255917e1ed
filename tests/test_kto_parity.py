"""Parity of alignlab's KTO with TRL's ``KTOTrainer`` (TRL 1.16, a test-only dependency).

Matched settings: the embedded SmolLM2-135M-Instruct; 2 short explicit-prompt preference pairs from the shared
HH-RLHF data (at most 80 tokens each), which both split into 4 unpaired rows (2 desirable, then 2 undesirable:
TRL's ``unpair_preference_dataset``);
fp32, no gradient checkpointing, a constant learning rate, one batch holding all 4 rows (TRL reads them in order;
alignlab puts a batch back in data order before pairing each prompt with the previous row's completion, so the
KL reference point's mismatched pairs are the same), dropout off, AdamW (0.9/0.999, eps 1e-8, no weight decay),
gradient clipping at 1.0, beta 0.1, both class weights 1.

* Step 1 (policy == reference): ``logps/chosen`` and ``logps/rejected`` (and the token statistics ``entropy``,
  ``logits/chosen``, ``logits/rejected``) agree to 1e-3 relative (tokenization, EOS, the prompt/completion
  split, the log-prob sums).
* Step 2 (after one AdamW update): ``loss`` and ``rewards/margins`` agree to 2e-2 relative (the loss with its
  KL reference point, its gradient, clipping and the optimizer step); ``kl`` is printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_dpo_parity import SHARED_DATA, _explicit_rows, _rel_close

pytestmark = pytest.mark.integration

LEARNING_RATE = 1e-5
BETA = 0.1
MAX_LENGTH = 256
SEED = 42
STEP1_RTOL = 1e-3
STEP2_RTOL = 2e-2
SHARED = dict(learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
              adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False,
              gradient_checkpointing=False, gradient_accumulation_steps=1, max_steps=2, logging_steps=1, beta=BETA,
              desirable_weight=1.0, undesirable_weight=1.0, max_length=MAX_LENGTH, seed=SEED, disable_dropout=True)


def _run_alignlab(model_path: str, data_path: Path, output_dir: Path, batch: int) -> list[dict]:
    from alignlab.algorithms.kto import KTOConfig, train_kto

    cfg = KTOConfig(model_name_or_path=model_path, dataset_name=str(data_path), output_dir=str(output_dir),
                    per_device_train_batch_size=batch, save_steps=0, **SHARED)
    result = train_kto(cfg)
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def _run_trl(model_path: str, rows: list[dict], output_dir: Path, batch: int) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    args = TRLKTOConfig(output_dir=str(output_dir), use_cpu=True, fp16=False, optim="adamw_torch",
                        per_device_train_batch_size=batch, save_strategy="no", report_to="none", disable_tqdm=True,
                        loss_type="kto", model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0,
                        **SHARED)
    trainer = KTOTrainer(model=model_path, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_path))
    assert trainer.model.dtype == torch.float32 and trainer.args.device.type == "cpu"
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_kto_matches_trl_first_two_steps(tmp_path, monkeypatch):
    pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    if not SHARED_DATA.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from transformers import AutoTokenizer

    from alignlab.models import embedded_model_path

    import tests.test_dpo_parity as dpo_parity

    model_path = str(embedded_model_path())
    monkeypatch.setattr(dpo_parity, "N_ROWS", 2)  # fewer and shorter rows than DPO's test: TRL's KTO is slower
    monkeypatch.setattr(dpo_parity, "MAX_TOKENS", 80)
    rows = _explicit_rows(AutoTokenizer.from_pretrained(model_path))
    data_path = tmp_path / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    batch = 2 * len(rows)  # every pair split in two: one batch holds all rows

    ours = _run_alignlab(model_path, data_path, tmp_path / "alignlab", batch)
    theirs = _run_trl(model_path, rows, tmp_path / "trl", batch)
    assert [r["step"] for r in ours[:2]] == [1, 2], ours
    assert len(theirs) >= 2 and [r["step"] for r in theirs[:2]] == [1, 2], theirs

    keys = ("loss", "kl", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    report = "\n".join(f"step {s + 1} {key}: alignlab {ours[s][key]!r}  trl {theirs[s][key]!r}"
                       for s in range(2) for key in keys)
    print(report)
    checks = [(0, key, STEP1_RTOL) for key in ("logps/chosen", "logps/rejected", "entropy", "logits/chosen",
                                               "logits/rejected")]
    checks += [(1, key, STEP2_RTOL) for key in ("loss", "rewards/margins")]
    failures = [f"step {s + 1} {key}: alignlab {ours[s][key]:.6f} vs trl {theirs[s][key]:.6f}"
                for s, key, rtol in checks if not _rel_close(ours[s][key], theirs[s][key], rtol)]
    assert ours[0]["loss"] == pytest.approx(0.5, abs=1e-6) and theirs[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert abs(theirs[1]["rewards/margins"]) > 1e-3, f"step 2 margin too small to compare:\n{report}"
    assert not failures, "\n".join(failures) + "\nall values:\n" + report
    assert math.isfinite(ours[1]["kl"])
