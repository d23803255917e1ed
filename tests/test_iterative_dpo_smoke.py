"""Iterative DPO on the tiny model: best-vs-worst pairs, the round layout, held-out rewards, reruns that reuse
finished rounds and hand-edited pairs, and the reference choice."""

import json

import torch
import yaml

from alignlab.algorithms.iterative_dpo import IterativeDPOConfig, train_iterative_dpo
from alignlab.rollout.pairs import best_and_worst
from tests.conftest import one_line, run_cli

def _config(model, data, rewards, out, **kw):
    base = dict(
        model_name_or_path=model, dataset_name=str(data), output_dir=str(out), reward_funcs=[f"{rewards}:short"],
        rounds=2, samples_per_prompt=3, max_new_tokens=6, eval_split_size=2, max_steps=1,
        per_device_train_batch_size=2, learning_rate=1e-3, save_steps=0, bf16=False,
    )
    base.update(kw)
    return IterativeDPOConfig(**base)


def test_best_and_worst_by_hand():
    # group 0: best index 1, worst 2; group 1: all equal -> no pair; group 2: ties go to the first
    picks = best_and_worst(torch.tensor([0.5, 1.0, 0.0, 2.0, 2.0, 2.0, 3.0, 3.0, 1.0]), 3)
    assert picks == [(1, 2), None, (6, 8)]


def test_two_rounds_write_pairs_models_and_held_out_rewards(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    records = train_iterative_dpo(_config(tiny_model_dir, prompts_file, rewards_file, out))
    assert [r["round"] for r in records] == [1, 2]
    assert records[1]["held_out_reward_before"] == records[0]["held_out_reward_after"]
    for i in (1, 2):
        rows = [json.loads(line) for line in (out / f"round-{i}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == records[i - 1]["pairs"] > 0
        assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
        assert rows[0]["chosen"][0]["role"] == "assistant"  # conversational prompts give message completions
        assert (out / f"round-{i}" / "model" / "model.safetensors").exists()
    assert json.loads((out / "rounds.json").read_text()) == records
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_rerun_reuses_finished_rounds_and_edited_pairs(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    train_iterative_dpo(_config(tiny_model_dir, prompts_file, rewards_file, out, rounds=1))
    first = (out / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns
    # hand-edit round 2's pairs before it runs: the run must train on them as they are
    (out / "round-2").mkdir()
    edited = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "assistant", "content": "Go away, I am busy now."}]}
    (out / "round-2" / "pairs.jsonl").write_text(json.dumps(edited) + "\n")
    records = train_iterative_dpo(_config(tiny_model_dir, prompts_file, rewards_file, out, rounds=2, reference="initial"))
    assert (out / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns == first  # round 1 not redone
    assert records[1]["pairs"] == 1
    round_config = yaml.safe_load((out / "round-2" / "model" / "config.yaml").read_text())
    assert round_config["ref_model_name_or_path"] == tiny_model_dir  # --reference initial


def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path):
    code, _, err = run_cli(capsys, "iterative-dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name",
                           str(prompts_file), "--output_dir", str(tmp_path / "x"), "--samples_per_prompt", "1",
                           "--reward_funcs", f"{rewards_file}:short")
    assert code != 0 and "--samples_per_prompt must be >= 2" in one_line(err)
