"""Parity of alignlab's DPO with TRL's ``DPOTrainer`` (TRL 1.16, a test-only dependency).

Matched settings: the same model (the embedded SmolLM2-135M-Instruct) and the same explicit-prompt rows,
fp32, no gradient checkpointing, a constant learning rate, one batch holding all rows, dropout off, sigmoid
loss without label smoothing, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0.

* Step 1 (policy == reference, nothing trained yet): ``logps/chosen``, ``logps/rejected`` (and TRL's token
  statistics ``entropy``, ``logits/chosen``, ``logits/rejected``) agree to 1e-3 relative. This checks
  tokenization (prompt/completion split, EOS), truncation and the log-prob sums.
* Step 2 (after one full AdamW update): ``loss`` and ``rewards/margins`` agree to 2e-2 relative. This checks
  the loss, its gradient, clipping and the optimizer step.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"

N_ROWS = 4  # one batch holds all of them
MAX_TOKENS = 128  # only rows whose prompt+completion (+EOS) is at most this long: keeps the test fast on CPU
MAX_LENGTH = 256  # no truncation on either side
LEARNING_RATE = 1e-5  # large enough that step 2 visibly differs from step 1
BETA = 0.1
SEED = 42

STEP1_RTOL = 1e-3
STEP2_RTOL = 2e-2


def _explicit_rows(tokenizer) -> list[dict[str, str]]:
    """The first ``N_ROWS`` short rows of the shared HH-RLHF pairs, as explicit-prompt rows."""
    from alignlab.data.preference import split_implicit_prompt

    rows = []
    with gzip.open(SHARED_DATA, "rt", encoding="utf-8") as handle:
        for line in handle:
            raw = json.loads(line)
            prompt, chosen, rejected = split_implicit_prompt(raw["chosen"], raw["rejected"])
            if not (prompt and chosen.strip() and rejected.strip()) or chosen == rejected:
                continue
            longest = max(len(tokenizer(prompt + c + tokenizer.eos_token).input_ids) for c in (chosen, rejected))
            if longest > MAX_TOKENS:
                continue
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) == N_ROWS:
                break
    assert len(rows) == N_ROWS, f"only {len(rows)} rows of at most {MAX_TOKENS} tokens in {SHARED_DATA}"
    return rows


def _run_alignlab(model_path: str, data_path: Path, output_dir: Path, loss_args: dict | None = None) -> list[dict]:
    """alignlab's DPO for 2 steps; ``loss_args`` overrides the loss settings (loss_type, beta, ...)."""
    from alignlab.algorithms.dpo import DPOConfig, train_dpo

    cfg = DPOConfig(
        model_name_or_path=model_path,
        dataset_name=str(data_path),
        output_dir=str(output_dir),
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=N_ROWS,
        gradient_accumulation_steps=1,
        max_steps=2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_steps=0,
        max_length=MAX_LENGTH,
        truncation_mode="keep_start",
        seed=SEED,
        disable_dropout=True,
        **{"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0, **(loss_args or {})},
    )
    result = train_dpo(cfg)
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]  # training rows only


def _run_trl(model_path: str, rows: list[dict[str, str]], output_dir: Path,
             loss_args: dict | None = None) -> list[dict]:
    """TRL's DPOTrainer for 2 steps; ``loss_args`` overrides the loss settings as in :func:`_run_alignlab`."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    args = TRLDPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",  # plain torch.optim.AdamW, as alignlab
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        per_device_train_batch_size=len(rows),
        gradient_accumulation_steps=1,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=MAX_LENGTH,
        truncation_mode="keep_start",
        seed=SEED,
        disable_dropout=True,
        **{"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0, **(loss_args or {})},
        model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = DPOTrainer(
        model=model_path,  # loaded by TRL with model_init_kwargs (fp32); the reference model likewise
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert trainer.model.dtype == torch.float32
    assert trainer.args.device.type == "cpu"
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _rel_close(ours: float, theirs: float, rtol: float) -> bool:
    return math.isfinite(ours) and math.isfinite(theirs) and abs(ours - theirs) <= rtol * abs(theirs)


def _embedded_rows(folder: Path) -> tuple[str, list[dict[str, str]], Path]:
    """The embedded model's path, the ``N_ROWS`` explicit-prompt rows and their JSONL file in ``folder``; skips
    the test without trl or the shared data."""
    pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    if not SHARED_DATA.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from transformers import AutoTokenizer

    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    rows = _explicit_rows(AutoTokenizer.from_pretrained(model_path))
    data_path = folder / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_path, rows, data_path


REPORT_KEYS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def _two_step_report(ours: list[dict], theirs: list[dict]) -> tuple[str, float, float]:
    """Both sides logged steps 1 and 2; returns their values side by side and each side's loss change from
    step 1 to step 2 (the part of the step-2 loss the update made)."""
    assert [r["step"] for r in ours[:2]] == [1, 2], ours
    assert len(theirs) >= 2 and [r["step"] for r in theirs[:2]] == [1, 2], theirs
    report = "\n".join(f"step {s + 1} {key}: alignlab {ours[s][key]!r}  trl {theirs[s][key]!r}"
                       for s in range(2) for key in REPORT_KEYS)
    ours_change, theirs_change = ours[1]["loss"] - ours[0]["loss"], theirs[1]["loss"] - theirs[0]["loss"]
    report += f"\nloss change: alignlab {ours_change!r}  trl {theirs_change!r}"
    return report, ours_change, theirs_change


def _two_step_failures(ours: list[dict], theirs: list[dict], ours_change: float, theirs_change: float) -> list[str]:
    """Step 1's logps and loss to STEP1_RTOL; step 2's loss and margin, and the loss change, to STEP2_RTOL."""
    checks = [(0, key, STEP1_RTOL) for key in ("logps/chosen", "logps/rejected", "loss")]
    checks += [(1, key, STEP2_RTOL) for key in ("loss", "rewards/margins")]
    failures = [f"step {s + 1} {key}: alignlab {ours[s][key]:.6f} vs trl {theirs[s][key]:.6f} "
                f"(rel {abs(ours[s][key] - theirs[s][key]) / abs(theirs[s][key]):.2e} > {rtol})"
                for s, key, rtol in checks if not _rel_close(ours[s][key], theirs[s][key], rtol)]
    if not _rel_close(ours_change, theirs_change, STEP2_RTOL):
        failures.append(f"loss change step 1 -> 2: alignlab {ours_change:.6f} vs trl {theirs_change:.6f}")
    return failures


def test_dpo_matches_trl_first_two_steps(tmp_path):
    model_path, rows, data_path = _embedded_rows(tmp_path)
    ours = _run_alignlab(model_path, data_path, tmp_path / "alignlab")
    theirs = _run_trl(model_path, rows, tmp_path / "trl")
    report, _, _ = _two_step_report(ours, theirs)
    print(report)

    failures = []
    for key in ("logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected"):
        a, b = ours[0][key], theirs[0][key]
        if not _rel_close(a, b, STEP1_RTOL):
            failures.append(f"step 1 {key}: alignlab {a:.6f} vs trl {b:.6f} (rel {abs(a - b) / abs(b):.2e} > {STEP1_RTOL})")
    # Step 2 must differ visibly from step 1, or it would not test the update at all.
    assert abs(theirs[1]["rewards/margins"]) > 1e-3, f"step 2 margin too small to compare:\n{report}"
    for key in ("loss", "rewards/margins"):
        a, b = ours[1][key], theirs[1][key]
        if not _rel_close(a, b, STEP2_RTOL):
            failures.append(f"step 2 {key}: alignlab {a:.6f} vs trl {b:.6f} (rel {abs(a - b) / abs(b):.2e} > {STEP2_RTOL})")
    assert not failures, "\n".join(failures) + "\nall values:\n" + report
