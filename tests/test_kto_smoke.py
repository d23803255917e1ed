"""KTO on the tiny model: unpaired rows and preference pairs (split as TRL), the mismatched pairs of a batch, the
loss and TRL's metrics against a hand computation, metrics over subsets reduced across processes, a loss that
falls on a batch it overfits, and one-line errors."""

import json
import math

import pytest
import torch

from alignlab.algorithms.kto import KTOConfig, KTOTrainer, check_class_weights, subset_means
from alignlab.data.unpaired import build_unpaired_examples, collate_unpaired
from alignlab.losses.kto import kto_loss
from tests.conftest import free_port, one_line, read_metrics, run_cli


@pytest.fixture
def unpaired_file(tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}." if i % 3 else f"Maybe {2 * i + 1}.",
             "label": bool(i % 3)} for i in range(9)]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    base = dict(model_name_or_path=model, dataset_name=str(data), output_dir=str(out), per_device_train_batch_size=4,
                max_steps=2, learning_rate=1e-3, save_steps=0, logging_steps=1, bf16=False)
    base.update(kw)
    return KTOConfig(**base)


def test_pairs_are_split_and_batches_pair_each_prompt_with_the_previous_completion(tiny_tokenizer, pairs_file):
    from alignlab.data.io import read_rows

    examples, stats = build_unpaired_examples(read_rows(str(pairs_file)), tiny_tokenizer, max_length=None)
    assert stats.from_pairs and (stats.desirable, stats.undesirable) == (12, 12)
    assert [e["label"] for e in examples] == [True] * 12 + [False] * 12  # all chosen first, as TRL's unpairing
    eos = tiny_tokenizer.eos_token_id
    assert all(e["completion_ids"][-1] == eos for e in examples)
    assert tiny_tokenizer.decode(examples[0]["completion_ids"][:-1]).strip() == "0."
    batch = collate_unpaired([examples[5], examples[3], examples[4]], tiny_tokenizer.pad_token_id)
    # back in data order 3, 4, 5; mismatched: prompt 3 + completion 5, prompt 4 + completion 3, prompt 5 + completion 4
    def completion(prefix, row):
        ids, mask = batch[f"{prefix}input_ids"][row], batch[f"{prefix}completion_mask"][row].bool()
        return ids[mask].tolist()
    def prompt(prefix, row):
        ids, att, mask = (batch[f"{prefix}{k}"][row] for k in ("input_ids", "attention_mask", "completion_mask"))
        return ids[att.bool() & ~mask.bool()].tolist()
    assert [completion("", r) for r in range(3)] == [examples[i]["completion_ids"] for i in (3, 4, 5)]
    assert [completion("KL_", r) for r in range(3)] == [examples[i]["completion_ids"] for i in (5, 3, 4)]
    assert [prompt("KL_", r) for r in range(3)] == [examples[i]["prompt_ids"] for i in (3, 4, 5)]
    limit = len(examples[2]["prompt_ids"]) + 1  # the end is cut: one completion token left
    single = collate_unpaired([examples[2]], tiny_tokenizer.pad_token_id, max_length=limit)
    assert torch.equal(single["KL_input_ids"], single["input_ids"])  # a batch of one: paired with itself
    assert single["input_ids"].shape[1] == limit and int(single["completion_mask"].sum()) == 1


def test_kto_step_one_is_half_and_metrics_match_a_hand_computation(tiny_model_dir, unpaired_file, tmp_path):
    out = tmp_path / "run"
    trainer = KTOTrainer(_config(tiny_model_dir, unpaired_file, out, per_device_train_batch_size=9, max_steps=4,
                                 desirable_weight=1.0, undesirable_weight=1.5))
    policy = trainer.policy
    batch = collate_unpaired(trainer.train_examples, trainer.tokenizer.pad_token_id, max_length=1024)
    with torch.no_grad():  # perturb the policy so that it differs from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ((loss, metrics),) = trainer.compute_loss(policy, batch)
        logps = trainer._sequence_logps(policy, batch)
        ref = trainer._sequence_logps(trainer.ref_model, batch)
        z0 = (trainer._sequence_logps(policy, batch, "KL_") - trainer._sequence_logps(trainer.ref_model, batch, "KL_"))
    z0 = max(float(z0.mean()), 0.0)
    label = batch["label"]
    v = 0.1 * (logps - ref - z0)
    expected = torch.where(label, 1 - torch.sigmoid(v), 1.5 * (1 - torch.sigmoid(-v))).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z0, abs=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(0.1 * (logps - ref)[label].mean()), rel=1e-5)
    assert float(metrics["logps/rejected"]) == pytest.approx(float(logps[~label].mean()), rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(
        float(metrics["rewards/chosen"] - metrics["rewards/rejected"]), abs=1e-7)


def test_kto_trains_and_its_loss_falls_on_the_batch_it_overfits(tiny_model_dir, unpaired_file, tmp_path):
    out = tmp_path / "run"
    KTOTrainer(_config(tiny_model_dir, unpaired_file, out, per_device_train_batch_size=9, max_steps=4)).train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1: policy == reference: every v is 0, every loss 1 - sigmoid(0), the reference point 0
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[0]["kl"] == 0.0 and rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    for name in ("rewards/rejected", "logps/chosen", "logps/rejected", "num_tokens"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert (out / "plots" / "rewards.png").exists() and (out / "model.safetensors").exists()


def test_pairs_train_with_an_eval_split(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "pairs"
    result = KTOTrainer(_config(tiny_model_dir, pairs_file, out, eval_split_size=0.25, max_steps=2)).train()
    assert math.isfinite(result.eval_metrics["eval_loss"]) and "eval_rewards/margins" in result.eval_metrics


def test_subset_metrics_are_reduced_over_processes_as_trl():
    # process 0 has two desirable examples, process 1 one undesirable and one desirable
    mine = {"rewards/chosen": torch.tensor([1.0, 2.0]), "logps/chosen": torch.tensor([-3.0, -5.0])}
    other = {"rewards/chosen": torch.tensor([6.0]), "logps/chosen": torch.tensor([-1.0]),
             "rewards/rejected": torch.tensor([-4.0]), "logps/rejected": torch.tensor([-7.0])}

    def gather(local):  # what accelerate's gather returns on two processes
        return torch.cat([local, torch.tensor(
            [[float(other[n].sum()), float(other[n].numel())] if n in other else [0.0, 0.0]
             for n in ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")]).reshape(-1)])

    out = subset_means(mine, gather)
    assert float(out["rewards/chosen"]) == pytest.approx(3.0)  # (1 + 2 + 6) / 3
    assert float(out["logps/chosen"]) == pytest.approx(-3.0)
    assert float(out["rewards/rejected"]) == pytest.approx(-4.0)
    assert float(out["rewards/margins"]) == pytest.approx(7.0)
    alone = subset_means(mine, lambda t: t)
    assert "rewards/rejected" not in alone and "rewards/margins" not in alone


def test_kto_loss_metrics_and_class_weight_advice():
    losses, metrics = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]),
                               torch.tensor(0.2), beta=0.5)
    assert losses.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-0.15)), 1 - 1 / (1 + math.exp(-0.6))])
    assert check_class_weights(10, 10, 1.0, 1.0) is None
    assert check_class_weights(10, 20, 2.2, 1.0) is None  # desirable_weight in [2.0, 2.66]
    assert "--desirable_weight in [2.0, 2.66]" in check_class_weights(10, 20, 1.0, 1.0)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "completion": "b", "label": "yes"}], "field 'label' must be true or false"),
        ([{"prompt": "a", "completion": "b"}], "missing field 'label'"),
        ([{"prompt": "a", "completion": "", "label": True}], "field 'completion' is empty"),
    ],
)
def test_bad_rows_are_one_line_errors(capsys, tiny_model_dir, tmp_path, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "kto", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data),
                           "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--bf16", "false")
    assert code != 0
    line = one_line(err)
    assert message in line and "bad.jsonl" in line


def test_batch_of_one_is_refused(capsys, tiny_model_dir, unpaired_file, tmp_path):
    code, _, err = run_cli(capsys, "kto", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(unpaired_file),
                           "--output_dir", str(tmp_path / "o"), "--per_device_train_batch_size", "1")
    assert code != 0 and "--per_device_train_batch_size must be >= 2" in one_line(err)


@pytest.mark.integration
def test_two_processes_reduce_subset_metrics_without_hanging(tiny_model_dir, unpaired_file, tmp_path):
    """Batches of 2 per process over 9 rows (3 undesirable): some micro-batches hold one class on one process and
    none on the other, so the per-subset sums and counts must be reduced across processes (a per-example gather
    of unequal sizes would fail or hang)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "alignlab.cli", "kto", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(unpaired_file),
           "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
           "--learning_rate", "1e-3", "--save_steps", "0", "--bf16", "false", "--eval_split_size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0
    assert all(math.isfinite(r["rewards/chosen"]) for r in rows)


def test_precompute_ref_log_probs_frees_the_reference_and_trains_as_live(tiny_model_dir, unpaired_file, tmp_path):
    """TRL's precompute_ref_log_probs for KTO: the reference log-probs of every example and of its mismatched
    pair are computed once; the reference model is freed; the run is the live-reference run (sequential rows)."""
    live = KTOTrainer(_config(tiny_model_dir, unpaired_file, tmp_path / "a", max_steps=2))
    pre = KTOTrainer(_config(tiny_model_dir, unpaired_file, tmp_path / "b", max_steps=2, precompute_ref_log_probs=True))
    assert pre.ref_model is None and live.ref_model is not None
    first = sorted(pre.train_examples, key=lambda e: e["index"])[:4]
    # block of 4 in data order, completions rotated by one: prompt i meets completion i - 1
    assert [e["KL_completion_ids"] for e in first] == [first[3]["completion_ids"]] + [
        e["completion_ids"] for e in first[:3]]
    with torch.no_grad():
        batch = collate_unpaired(first, live.tokenizer.pad_token_id, max_length=live.config.max_length)
        assert batch["ref_logps"].tolist() == pytest.approx(live._sequence_logps(live.ref_model, batch).tolist(), abs=1e-5)
        assert batch["ref_KL_logps"].tolist() == pytest.approx(
            live._sequence_logps(live.ref_model, batch, "KL_").tolist(), abs=1e-5)
    live.train()
    pre.train()
    for a, b in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        for name in ("loss", "kl", "rewards/margins"):
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), name
