"""Multi-objective DPO (weighted preference sets) and contrastive DPO on the tiny model."""

import json
import math

import pytest
import torch

from alignlab.algorithms.dpo import DPOConfig, DPOTrainer, parse_objectives
from alignlab.data.preference import collate_pairs, contrastive_rows
from alignlab.errors import UserError
from tests.conftest import read_metrics


@pytest.fixture
def two_sets(tmp_path):
    a = tmp_path / "math.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                                     "rejected": f"Well, maybe {2 * i + 1}."}) + "\n" for i in range(6)))
    b = tmp_path / "colors.jsonl"
    b.write_text("".join(json.dumps({"prompt": f"Name color {i}.", "chosen": "Red.",
                                     "rejected": "I do not know colors."}) + "\n" for i in range(3)))
    return a, b


def test_parse_objectives():
    (one,) = parse_objectives("builtin:concise")
    assert (one.path, one.weight) == ("builtin:concise", None)
    objs = parse_objectives(["data/a.jsonl:0.5", "builtin:concise:2", {"path": "c.parquet", "weight": 1, "name": "style"}])
    assert [(o.path, o.weight, o.name) for o in objs] == [("data/a.jsonl", 0.5, "a"), ("builtin:concise", 2.0, "concise"),
                                                          ("c.parquet", 1.0, "style")]
    assert [o.name for o in parse_objectives(["x/a.jsonl:1", "y/a.jsonl:1"])] == ["a", "a_2"]
    with pytest.raises(UserError, match="give every data set a weight"):
        parse_objectives(["a.jsonl:1", "b.jsonl"])
    with pytest.raises(UserError, match="weight must be a positive number"):
        parse_objectives(["a.jsonl:-1", "b.jsonl:1"])


def test_contrastive_rows_by_hand():
    # prompts [1, 2] and [3]; chosen completions [7, 8] and [9]; a third example repeats prompt [1, 2]
    examples = [
        {"chosen_input_ids": [1, 2, 7, 8], "chosen_completion_mask": [0, 0, 1, 1]},
        {"chosen_input_ids": [3, 9], "chosen_completion_mask": [0, 1]},
        {"chosen_input_ids": [1, 2, 5], "chosen_completion_mask": [0, 0, 1]},
    ]
    ids, masks, pairs = contrastive_rows(examples)
    # (0, 2) and (2, 0) share a prompt and are skipped
    assert pairs == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert ids == [[1, 2, 9], [3, 7, 8], [3, 5], [1, 2, 9]]
    assert masks == [[0, 0, 1], [0, 1, 1], [0, 1], [0, 0, 1]]


def test_weighted_objectives_and_contrastive_term_at_the_reference(tiny_model_dir, two_sets, tmp_path):
    a, b = two_sets
    cfg = DPOConfig(model_name_or_path=tiny_model_dir, dataset_name=[f"{a}:0.7", f"{b}:0.3"], output_dir=str(tmp_path / "o"),
                    per_device_train_batch_size=2, max_steps=2, logging_steps=1, bf16=False, save_steps=0,
                    contrastive_weight=0.5, learning_rate=1e-3)
    trainer = DPOTrainer(cfg)
    assert len(trainer.train_examples) == 6  # an epoch is the larger set; colours repeat
    items = [trainer.train_examples[k] for k in range(2)]
    batch = collate_pairs(items, trainer.tokenizer.pad_token_id, contrastive=True)
    assert batch["objective"].tolist() == [0, 1, 0, 1] and batch["input_ids"].shape[0] == 8 + 12
    with torch.no_grad():
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, batch)
    # policy == reference: every log-ratio is 0, every DPO term is log 2: 0.7 log2 + 0.3 log2 + 0.5 log2
    assert float(loss) == pytest.approx(1.5 * math.log(2), abs=1e-5)
    assert metrics["math/rewards/margins"].shape == (2,) and metrics["contrastive/loss"].shape == (12,)
    trainer.train()
    row = read_metrics(tmp_path / "o")[-1]
    for key in ("math/loss", "colors/loss", "math/rewards/accuracies", "colors/rewards/margins", "contrastive/loss"):
        assert math.isfinite(row[key])


def test_one_plain_data_set_behaves_as_before(pairs_file, tmp_path):
    cfg = DPOConfig(dataset_name=[str(pairs_file)], output_dir=str(tmp_path / "x"))
    assert cfg.dataset_name == str(pairs_file) and cfg.objectives[0].weight is None
    with pytest.raises(UserError, match="drop --precompute_ref_log_probs"):
        DPOConfig(dataset_name=str(pairs_file), output_dir="x", contrastive_weight=1.0, precompute_ref_log_probs=True)
