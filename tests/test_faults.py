"""Runs that survive faults: ``kill -9`` then resume (DPO, GRPO, PPO reproduce the uninterrupted run),
SIGTERM / SIGINT (a checkpoint, then exit 143 / 130), non-finite losses (skipped, counted, a limit),
reward functions that fail (``--reward_func_errors raise|drop``) and a full disk while checkpointing."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import one_line, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[1]
# measured, not reproduced: wall-clock times and rates
UNSTABLE = ("time/", "tokens_per_second")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.endswith("\n")]


def _args(method: str, model: str, out: Path, data: Path, rewards: Path) -> list[str]:
    common = ["--model_name_or_path", model, "--output_dir", str(out), "--dataset_name", str(data),
              "--save_steps", "1", "--logging_steps", "1", "--bf16", "false", "--learning_rate", "1e-3",
              "--seed", "7"]
    if method == "dpo":
        return ["dpo", *common, "--per_device_train_batch_size", "4", "--max_length", "64", "--max_steps", "7"]
    online = ["--reward_funcs", f"{rewards}:short", "--sample_steps", "1", "--max_steps", "6"]
    if method == "grpo":
        return ["grpo", *common, *online, "--per_device_train_batch_size", "4", "--num_generations", "4",
                "--gradient_accumulation_steps", "2",
                "--max_completion_length", "6", "--beta", "0.1",
                "--loss_type", "bnpo"]  # bnpo: each micro-batch is normalised by its own tokens, so the shuffle counts
    return ["ppo", *common, *online, "--per_device_train_batch_size", "2", "--num_mini_batches", "2",
            "--num_ppo_epochs", "2", "--response_length", "6"]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignlab.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "alignlab.cli", *argv], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _wait_for_rows(proc: subprocess.Popen, out: Path, rows: int) -> None:
    deadline = time.monotonic() + 600
    while len(_rows(out)) < rows:
        assert proc.poll() is None, f"the run ended before step {rows}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _assert_same_rows(resumed: list[dict], full: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        keys = {k for k in a if not k.startswith(UNSTABLE)}
        assert keys == {k for k in b if not k.startswith(UNSTABLE)}, a["step"]
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.mark.integration
@pytest.mark.parametrize("method", ["dpo", "grpo", "ppo"])
def test_kill_9_then_resume_ends_like_the_uninterrupted_run(method, tiny_model_dir, pairs_file, prompts_file,
                                                           rewards_file, tmp_path):
    data = pairs_file if method == "dpo" else prompts_file
    full_out, out = tmp_path / "full", tmp_path / "killed"
    _run(_args(method, tiny_model_dir, full_out, data, rewards_file))
    full = _rows(full_out)
    steps = len(full)
    rng = random.Random(f"kill-{method}")
    # three SIGKILLs, each once the row of a chosen step is written, after a random delay (mid-step or
    # mid-checkpoint), each resumed from the newest complete checkpoint
    kills = sorted(rng.sample(range(2, steps), 3))
    argv = _args(method, tiny_model_dir, out, data, rewards_file)
    for i, at in enumerate(kills):
        proc = _start(argv + (["--resume_from_checkpoint", "true"] if i else []))
        _wait_for_rows(proc, out, at)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    _run(argv + ["--resume_from_checkpoint", "true"])
    _assert_same_rows(_rows(out), full)
    assert not list(out.glob(".checkpoint-*"))  # a partial checkpoint left by a kill is gone
    if method != "dpo":  # the samples too: each step's once, the same completions as the uninterrupted run's
        def samples(folder):
            return [(s["step"], s["completion"]) for s in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())]

        assert samples(out) == samples(full_out) and samples(out)


def test_the_rollout_shuffle_is_saved_in_checkpoints_and_restored(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    # GRPO's and PPO's own generator (the order of rows in micro- and mini-batches) is part of the checkpoint
    from alignlab.algorithms.grpo import GRPOConfig, GRPOTrainer
    from alignlab.train.checkpoint import LoopState, load_checkpoint, save_checkpoint

    cfg = GRPOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(tmp_path),
                     reward_funcs=[f"{rewards_file}:short"], per_device_train_batch_size=4, num_generations=4,
                     max_steps=2, save_steps=0, bf16=False)
    trainer = GRPOTrainer(cfg)
    torch.randperm(8, generator=trainer.shuffle)  # a step's draw
    path = save_checkpoint(trainer.accelerator, tmp_path, LoopState(global_step=1), keep=None)
    expected = torch.randperm(8, generator=trainer.shuffle)
    torch.randperm(8, generator=trainer.shuffle)  # drawn on after the checkpoint (the killed run)
    load_checkpoint(trainer.accelerator, path)
    assert torch.equal(torch.randperm(8, generator=trainer.shuffle), expected)
    fresh = torch.Generator().manual_seed(cfg.seed)
    assert not torch.equal(torch.randperm(8, generator=fresh), expected)  # the seed alone would not give it

    # a checkpoint written by another number of processes is refused in one line, before anything is loaded
    import json

    from alignlab.errors import UserError

    state = json.loads((path / "trainer_state.json").read_text())
    assert state["num_processes"] == 1
    (path / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(UserError, match=r"written by 2 process\(es\) and this run has 1; resume with 2"):
        load_checkpoint(trainer.accelerator, path)


# --- SIGTERM / SIGINT -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigterm_writes_a_checkpoint_exits_143_and_the_run_resumes(tiny_model_dir, pairs_file, rewards_file, tmp_path):
    full_out, out = tmp_path / "full", tmp_path / "stopped"
    argv = _args("dpo", tiny_model_dir, out, pairs_file, rewards_file)
    argv[argv.index("--save_steps") + 1] = "0"  # no periodic checkpoint: the one found must be the signal's
    full_argv = _args("dpo", tiny_model_dir, full_out, pairs_file, rewards_file)
    full_argv[full_argv.index("--save_steps") + 1] = "0"
    _run(full_argv)
    proc = _start(argv)
    _wait_for_rows(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err
    stopped = len(_rows(out))
    assert 3 <= stopped < 7
    line = one_line(err.replace("SIGTERM received", "data SIGTERM received"))  # the warning aside
    assert line == (f"training stopped by SIGTERM after step {stopped}: {out / f'checkpoint-{stopped}'} written; "
                    "resume with --resume_from_checkpoint true")
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{stopped}"]
    assert not (out / "model.safetensors").exists()  # stopped, not finished
    _run(argv + ["--resume_from_checkpoint", "true"])
    _assert_same_rows(_rows(out), _rows(full_out))


def _dpo_trainer(model, data, out, **kw):
    from alignlab.algorithms.dpo import DPOConfig, DPOTrainer

    base = dict(model_name_or_path=model, dataset_name=str(data), output_dir=str(out), per_device_train_batch_size=4,
                max_steps=5, logging_steps=1, learning_rate=1e-3, save_steps=0, bf16=False, max_length=64, seed=7)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base))


def _on_calls(trainer, calls: set[int], action):
    """Wrap the trainer's loss: on the given (1-based) calls, ``action(loss) -> loss``; returns the call log
    (a snapshot of one weight before each call)."""
    original = trainer.compute_loss
    log = []

    def compute_loss(model, batch):
        log.append(next(model.parameters()).detach().clone())
        for loss, metrics in original(model, batch):
            yield (action(loss) if len(log) in calls else loss), metrics

    trainer.compute_loss = compute_loss
    return log


def test_sigint_stops_after_the_step_with_a_checkpoint_and_exit_130(tiny_model_dir, pairs_file, tmp_path):
    from alignlab.train.loop import TrainingInterrupted

    trainer = _dpo_trainer(tiny_model_dir, pairs_file, tmp_path / "run")

    def interrupt(loss):  # Ctrl-C in the middle of step 2
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    _on_calls(trainer, {2}, interrupt)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train()
    assert info.value.code == 130 and info.value.step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]  # step 2 completed, not cut short
    assert info.value.checkpoint == tmp_path / "run" / "checkpoint-2"
    assert json.loads((info.value.checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back


# --- non-finite loss or gradient ------------------------------------------------------------------------------
def test_nonfinite_updates_are_skipped_and_counted(tiny_model_dir, pairs_file, tmp_path):
    trainer = _dpo_trainer(tiny_model_dir, pairs_file, tmp_path / "run", logging_nan_inf_filter=False)
    weight = next(trainer.model.parameters()) if hasattr(trainer, "model") else None
    # step 2: a NaN loss; step 4: a finite loss (0) whose gradient is NaN (sqrt's slope at 0 times 0)
    log = _on_calls(trainer, {2, 4}, lambda loss: loss * float("nan") if len(log) == 2
                    else loss + torch.sqrt(0.0 * loss))
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 2, 2]
    assert math.isnan(rows[1]["loss"]) and math.isnan(rows[1]["grad_norm"])
    assert math.isfinite(rows[3]["loss"]) and math.isnan(rows[3]["grad_norm"])
    assert all(math.isfinite(rows[i]["loss"]) and math.isfinite(rows[i]["grad_norm"]) for i in (0, 2, 4))
    # the skipped updates left the weights as they were: before step 3 as before step 2, before 5 as before 4
    assert torch.equal(log[2], log[1]) and torch.equal(log[4], log[3])
    assert not torch.equal(log[1], log[0]) and not torch.equal(log[3], log[2])
    del weight


def test_too_many_nonfinite_updates_stop_with_one_line_and_keep_the_checkpoint(tiny_model_dir, pairs_file,
                                                                                tmp_path):
    from alignlab.errors import UserError
    from alignlab.train.checkpoint import find_latest_checkpoint

    out = tmp_path / "run"
    trainer = _dpo_trainer(tiny_model_dir, pairs_file, out, max_nonfinite_steps=1, save_steps=1)
    _on_calls(trainer, {2, 4}, lambda loss: loss * float("inf"))
    with pytest.raises(UserError) as info:
        trainer.train()
    assert str(info.value) == (f"2 updates had a non-finite loss or gradient, more than --max_nonfinite_steps 1; "
                               f"stopped at step 4, last checkpoint: {out / 'checkpoint-3'}")
    assert find_latest_checkpoint(out) == out / "checkpoint-3"
    assert [r["nonfinite_steps"] for r in read_metrics(out)] == [0, 1, 1]
    # the checkpoint resumes (and counts on from 1: one more bad update is over the limit again)
    trainer = _dpo_trainer(tiny_model_dir, pairs_file, out, max_nonfinite_steps=1, save_steps=1,
                           resume_from_checkpoint="true")
    _on_calls(trainer, {2}, lambda loss: loss * float("nan"))  # the resumed run's 2nd call is step 5
    with pytest.raises(UserError, match="2 updates had a non-finite .* stopped at step 5"):
        trainer.train()


def test_max_nonfinite_steps_must_not_be_negative(tiny_model_dir, pairs_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file),
                           "--output_dir", str(tmp_path / "o"), "--max_nonfinite_steps", "-1")
    assert code == 1 and one_line(err) == "alignlab dpo: error: --max_nonfinite_steps must be >= 0, got -1"


# --- full disk while checkpointing ----------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model_dir, pairs_file, tmp_path,
                                                                      capsys, monkeypatch):
    import accelerate

    out = tmp_path / "run"
    real_save_state = accelerate.Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 3:  # the third checkpoint: part of it written, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real_save_state(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    argv = ["dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file), "--output_dir",
            str(out), "--per_device_train_batch_size", "4", "--max_steps", "5", "--save_steps", "1", "--bf16",
            "false", "--max_length", "64", "--logging_steps", "1"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert one_line(err) == (f"alignlab dpo: error: could not write checkpoint-3 in {out}: [Errno 28] No space "
                             f"left on device: '{out / '.checkpoint-3.partial' / 'optimizer.bin'}' (the earlier "
                             "checkpoints are intact)")
    assert not list(out.glob(".checkpoint-*"))  # the partial folder is gone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real_save_state)
    code, _, err = run_cli(capsys, *argv, "--resume_from_checkpoint", "true")  # checkpoint-2 loads
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


# --- reward functions that fail -------------------------------------------------------------------------------
NAN_FOR_ONE_PROMPT = (
    "def flaky(prompts, completions, **kw):\n"
    "    return [float('nan') if 'about 1.' in str(p) else -float(len(str(c))) / 10\n"
    "            for p, c in zip(prompts, completions)]\n"
)


def _grpo_argv(model, data, rewards, out, *extra):
    return ["grpo", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out),
            "--reward_funcs", f"{rewards}:flaky", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--num_generations", "4", "--max_completion_length", "6",
            "--max_steps", "3", "--save_steps", "0", "--bf16", "false", "--sample_steps", "1", "--logging_steps", "1",
            *extra]


def test_reward_func_errors_raise_names_the_function(tiny_model_dir, prompts_file, tmp_path, capsys):
    rewards = tmp_path / "flaky.py"
    rewards.write_text(NAN_FOR_ONE_PROMPT)
    code, _, err = run_cli(capsys, *_grpo_argv(tiny_model_dir, prompts_file, rewards, tmp_path / "o"))
    assert code == 1
    line = one_line(err)
    assert line.startswith("alignlab grpo: error: ") and f"{rewards}:flaky" in line and "nan" in line.lower()


def test_reward_func_errors_drop_leaves_the_prompts_group_out(tiny_model_dir, prompts_file, tmp_path, capsys):
    rewards = tmp_path / "flaky.py"
    rewards.write_text(NAN_FOR_ONE_PROMPT)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, *_grpo_argv(tiny_model_dir, prompts_file, rewards, out,
                                               "--reward_func_errors", "drop"))
    assert code == 0, err
    rows = read_metrics(out)
    # 6 prompts, 2 per step: the 3 steps see each prompt once; "about 1." loses its group of 4 completions
    assert sorted(r["rewards/dropped"] for r in rows) == [0.0, 0.0, 4.0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    bad_step = next(r["step"] for r in rows if r["rewards/dropped"])
    assert [s["step"] for s in samples].count(bad_step) == 4  # the other prompt's group only
    assert not any("about 1." in str(s["prompt"]) for s in samples)
    assert len(samples) == 4 + 8 + 8


def test_without_bad_rewards_drops_whole_groups():
    from alignlab.rollout.experience import ScoredCompletions
    from alignlab.data.sequences import build_sequences
    from alignlab.rollout.generation import Completions

    ids = [[5, 6], [7], [8, 9, 10], [11]]
    seq = build_sequences([[1, 2]] * 4, ids, 0)
    scored = ScoredCompletions(
        examples=[{"prompt": "a"}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "b"}],
        completions=Completions(ids=ids, has_eos=[True, False, True, False], prompt_index=[0, 0, 1, 1]),
        sequences=seq, texts=["w", "x", "y", "z"], scores=torch.tensor([1.0, 2.0, float("nan"), 4.0]),
        per_source={"f": torch.tensor([1.0, 2.0, float("nan"), 4.0])}, generation_seconds=1.0, scoring_seconds=1.0,
    )
    groups = scored.without_bad_rewards(2)  # the second prompt's pair goes
    assert groups.texts == ["w", "x"] and groups.dropped == 2 and groups.metrics()["rewards/dropped"] == 2.0
    assert torch.equal(groups.scores, torch.tensor([1.0, 2.0]))
    assert torch.equal(groups.sequences["input_ids"], seq["input_ids"][:2, : groups.sequences["input_ids"].shape[1]])
    rows = scored.without_bad_rewards(1)  # one by one: only the bad completion goes
    assert rows.texts == ["w", "x", "z"] and rows.completions.ids == [[5, 6], [7], [11]] and rows.dropped == 1
    assert "rewards/dropped" not in scored.metrics()  # not asked: not logged
    none_bad = ScoredCompletions(**{**scored.__dict__, "scores": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    assert none_bad.without_bad_rewards(2).metrics()["rewards/dropped"] == 0.0
    all_bad = ScoredCompletions(**{**scored.__dict__, "scores": torch.full((4,), float("nan"))})
    from alignlab.errors import UserError

    with pytest.raises(UserError, match="every one of the 4 completions"):
        all_bad.without_bad_rewards(2)



# --- loading faults: one line naming the path and what is wrong -----------------------------------------------
def _model_copy(tiny_model_dir, tmp_path, name, keep) -> Path:
    import shutil

    folder = tmp_path / name
    folder.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        if item.name in keep:
            shutil.copy2(item, folder / item.name)
    return folder


def test_model_folders_that_do_not_load_are_one_line(capsys, tiny_model_dir, pairs_file, prompts_file, tmp_path):
    only_config = _model_copy(tiny_model_dir, tmp_path, "only-config", {"config.json"})
    truncated = _model_copy(tiny_model_dir, tmp_path, "truncated", {p.name for p in Path(tiny_model_dir).iterdir()})
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "todo.txt").write_text("x")
    dpo = ["dpo", "--dataset_name", str(pairs_file), "--output_dir", str(tmp_path / "out"), "--bf16", "false"]
    cases = [
        (dpo + ["--model_name_or_path", str(only_config)],
         f"--model_name_or_path: {only_config} has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
         "tokenizer.model, vocab.json)"),
        (dpo + ["--model_name_or_path", str(truncated)],
         f"--model_name_or_path: {truncated}: model.safetensors is truncated or corrupt (Error while deserializing "
         "header: incomplete metadata, file not fully covered); save or download the model again"),
        (dpo + ["--model_name_or_path", str(pairs_file)], f"--model_name_or_path: {pairs_file} is a file, not a model folder"),
        (["evaluate", "--model_name_or_path", str(not_a_model), "--dataset_name", str(prompts_file), "--reward_funcs",
          "alignlab.tasks.arithmetic:arithmetic_reward"],
         f"--model_name_or_path: {not_a_model} is not a model folder (it has no config.json)"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and one_line(err) == f"alignlab {argv[0]}: error: {expected}"
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_reward_model_path_without_a_trained_score_head_is_one_line(capsys, tiny_model_dir, prompts_file,
                                                                      pairs_file, tmp_path):
    expected = (f"--reward_model_path: {tiny_model_dir} has no trained score head (it is not a reward model: train "
                "one with `alignlab reward`)")
    code, _, err = run_cli(capsys, "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(tmp_path / "o"), "--reward_model_path", tiny_model_dir,
                           "--per_device_train_batch_size", "4", "--num_generations", "4", "--bf16", "false")
    assert code == 1 and one_line(err) == f"alignlab grpo: error: {expected}"
    code, _, err = run_cli(capsys, "score", "--reward_model_path", tiny_model_dir, "--dataset_name", str(pairs_file),
                           "--bf16", "false")
    assert code == 1 and one_line(err) == f"alignlab score: error: {expected}"


def test_a_damaged_checkpoint_is_named_and_true_resumes_the_newest_whole_one(tiny_model_dir, pairs_file, tmp_path,
                                                                             caplog):
    from alignlab.errors import UserError
    from alignlab.train.checkpoint import checkpoint_problem

    out = tmp_path / "run"
    _dpo_trainer(tiny_model_dir, pairs_file, out, save_steps=1, max_steps=4).train()  # checkpoints 1 to 3
    model = out / "checkpoint-3" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a copy cut short
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert checkpoint_problem(out / "checkpoint-2").startswith("optimizer.bin is truncated or corrupt")
    # a named checkpoint: one line, and which older one can be used instead
    with pytest.raises(UserError) as info:
        _dpo_trainer(tiny_model_dir, pairs_file, out, save_steps=1, max_steps=5,
                     resume_from_checkpoint=str(out / "checkpoint-3")).train()
    assert str(info.value) == (
        f"--resume_from_checkpoint: {out / 'checkpoint-3'} cannot be resumed: model.safetensors is truncated or "
        "corrupt (Error while deserializing header: incomplete metadata, file not fully covered); the newest whole "
        f"checkpoint before it is {out / 'checkpoint-1'}: resume with --resume_from_checkpoint {out / 'checkpoint-1'}")
    # true: the newest whole one, with a warning for each damaged one passed over
    with caplog.at_level("WARNING"):
        _dpo_trainer(tiny_model_dir, pairs_file, out, save_steps=1, max_steps=5, resume_from_checkpoint="true").train()
    assert f"{out / 'checkpoint-3'} cannot be resumed: model.safetensors is truncated" in caplog.text
    assert f"{out / 'checkpoint-2'} cannot be resumed: optimizer.bin is truncated" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]  # steps 2 to 4 again, from checkpoint-1
    assert checkpoint_problem(out / "checkpoint-4") is None


def test_a_checkpoint_that_does_not_load_is_one_line(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    import accelerate

    from alignlab.errors import UserError

    out = tmp_path / "run"
    _dpo_trainer(tiny_model_dir, pairs_file, out, save_steps=1, max_steps=3).train()  # checkpoints 1 and 2

    def load_state(self, input_dir=None, **kw):
        raise RuntimeError("Error(s) in loading state_dict for LlamaForCausalLM:\n\tsize mismatch")

    monkeypatch.setattr(accelerate.Accelerator, "load_state", load_state)
    with pytest.raises(UserError) as info:
        _dpo_trainer(tiny_model_dir, pairs_file, out, max_steps=4, resume_from_checkpoint="true").train()
    assert str(info.value) == (f"--resume_from_checkpoint: cannot load {out / 'checkpoint-2'}: Error(s) in loading "
                               f"state_dict for LlamaForCausalLM:; the newest whole checkpoint before it is "
                               f"{out / 'checkpoint-1'}: resume with --resume_from_checkpoint {out / 'checkpoint-1'}")


# --- hung reward functions and stopping ------------------------------------------------------------------------
HANGING_REWARD = (
    "import os, time\n"
    "def hang(prompts, completions, **kw):\n"
    "    calls = os.path.join(os.path.dirname(__file__), 'calls')\n"
    "    with open(calls, 'a') as f:\n"
    "        f.write('x')\n"
    "    if os.path.getsize(calls) >= int(os.environ.get('HANG_AT_CALL', '1')):\n"
    "        try:\n"
    "            time.sleep(3600)\n"
    "        except Exception:\n"
    "            pass  # a function that swallows errors cannot swallow the timeout\n"
    "    return [0.0 for _ in completions]\n"
)


def test_a_reward_function_that_does_not_return_is_stopped_by_reward_timeout(capsys, tiny_model_dir, prompts_file,
                                                                             tmp_path):
    rewards = tmp_path / "hang.py"
    rewards.write_text(HANGING_REWARD)
    out = tmp_path / "o"
    previous = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    code, _, err = run_cli(capsys, "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(out), "--reward_funcs", f"{rewards}:hang",
                           "--per_device_train_batch_size", "4", "--num_generations", "4",
                           "--max_completion_length", "4", "--max_steps", "2", "--bf16", "false",
                           "--reward_timeout", "1")
    assert time.monotonic() - start < 120
    assert code == 1 and one_line(err) == (f"alignlab grpo: error: reward function {rewards}:hang did not return "
                                           "within 1 s (--reward_timeout); it was stopped")
    assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert sorted(p.name for p in out.iterdir()) == [".alignlab.lock", "failed-run.log"]


def test_the_reward_timeout_gives_an_outer_timer_back():
    from alignlab.errors import UserError
    from alignlab.rollout.rewards import call_reward_func, reward_timeout

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        with reward_timeout(0.2):
            assert call_reward_func(lambda prompts, completions: [1.0] * len(completions), "quick", ["a"], ["b"]).tolist() == [1.0]
            with pytest.raises(UserError, match=r"^reward function slow did not return within 0.2 s"):
                call_reward_func(lambda prompts, completions: time.sleep(5), "slow", ["a"], ["b"])
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left <= 30.0 and not fired  # the outer timer runs on, its handler is back
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_sigterm_stops_a_hung_step_after_the_grace_period_and_keeps_the_checkpoint(tiny_model_dir, prompts_file,
                                                                                   tmp_path):
    # what `timeout` does: SIGTERM while the step hangs; the run ends within --stop_grace_period, exit 143
    from alignlab.train.checkpoint import checkpoint_problem

    rewards = tmp_path / "hang.py"
    rewards.write_text(HANGING_REWARD)
    out = tmp_path / "o"
    argv = ["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file), "--output_dir",
            str(out), "--reward_funcs", f"{rewards}:hang", "--per_device_train_batch_size", "4", "--num_generations",
            "4", "--max_completion_length", "4", "--max_steps", "3", "--save_steps", "1", "--bf16", "false",
            "--stop_grace_period", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "alignlab.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "HANG_AT_CALL": "2"}, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not ((tmp_path / "calls").exists() and (tmp_path / "calls").stat().st_size >= 2):  # step 2 hangs
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert time.monotonic() - sent < 2 + 30  # the grace period, and the time a process takes to exit
    assert "SIGTERM received: stopping after the current step (at most 2 s more; send it again to stop at once)" in err
    assert ("training stopped at once by SIGTERM in the middle of a step (the step did not end within "
            "--stop_grace_period 2 s); the checkpoints written before it are complete") in err
    assert "Traceback" not in err
    assert checkpoint_problem(out / "checkpoint-1") is None  # step 1's checkpoint, whole
    assert not list(out.glob(".checkpoint-*"))


def test_a_second_signal_or_no_grace_stops_at_once():
    from alignlab.train.loop import StopSignals

    with StopSignals(grace_period=60) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM  # the first: noted
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        assert info.value.code == 143
    with StopSignals(grace_period=0):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


# --- data files: one line naming the file, rows numbered from 1 -------------------------------------------------
def test_data_faults_name_the_file(tmp_path):
    from alignlab.data.io import read_rows
    from alignlab.errors import DataError, UserError

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text("prompt,chosen,rejected\n")
    for path in (blank, empty, header):
        with pytest.raises(DataError) as info:
            read_rows(str(path))
        assert str(info.value) == f"{path}: no rows (the file is empty, or holds only blank lines or a header)"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(UserError) as info:
        read_rows(f"{pairs}:abc")
    assert str(info.value) == (f"--dataset_name {pairs}:abc: 'abc' after ':' is not a weight (a positive number, "
                               f"as in {pairs}:0.5)")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(UserError) as info:
        read_rows(str(folder))
    assert str(info.value) == (f"--dataset_name: {folder} is a folder with neither a saved dataset "
                               "(dataset_info.json) nor data files (.jsonl, .jsonl.gz, .json, .json.gz, .parquet, "
                               ".csv, .arrow)")


def test_a_model_folder_as_data_is_one_line(tiny_model_dir):
    from alignlab.data.io import read_rows
    from alignlab.errors import UserError

    with pytest.raises(UserError, match=f"^--dataset_name: {tiny_model_dir} is a model folder, not a dataset$"):
        read_rows(tiny_model_dir)


def test_csv_rows_are_numbered_from_1_as_jsonl_lines_are(tmp_path):
    from alignlab.data.io import read_rows

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nQ1,A,B\nQ2,C,D\n")
    assert [loc for loc, _ in read_rows(str(path))] == [f"{path} row 1", f"{path} row 2"]
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert [loc for loc, _ in read_rows(str(lines))] == [f"{lines}:1", f"{lines}:2"]


def test_save_only_model_checkpoints_hold_the_model_and_refuse_to_resume(tiny_model_dir, pairs_file, tmp_path):
    """TrainingArguments' save_only_model: no optimizer, scheduler or random states in checkpoint-N; resuming
    from it is a one-line error, as transformers cannot resume it either."""
    from alignlab.algorithms.dpo import DPOConfig, train_dpo
    from alignlab.errors import UserError
    from tests.conftest import tiny_config

    out = tmp_path / "run"
    train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, out, max_steps=2, save_steps=1, save_only_model=True))
    names = {p.name for p in (out / "checkpoint-1").iterdir()}
    assert "model.safetensors" in names and "trainer_state.json" in names
    assert not any(n.startswith(("optimizer", "scheduler", "random_states")) for n in names), names
    with pytest.raises(UserError, match="holds the model only"):
        train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, tmp_path / "again", max_steps=2,
                              resume_from_checkpoint=str(out / "checkpoint-1")))


def test_save_on_each_node_lets_each_machines_main_process_write(tmp_path):
    """TrainingArguments' save_on_each_node: the local main process of a machine that is not the run's main one
    writes checkpoint-N too; accelerate gets ProjectConfiguration(save_on_each_node=True)."""
    from types import SimpleNamespace

    from alignlab.train.checkpoint import LoopState, save_checkpoint
    from alignlab.train.trl_args import accelerator_options

    def save_state(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"")

    second_machine = SimpleNamespace(is_main_process=False, is_local_main_process=True, num_processes=2,
                                     wait_for_everyone=lambda: None, save_state=save_state)
    save_checkpoint(second_machine, tmp_path / "a", LoopState(1, 0, 1), keep=None)
    assert not (tmp_path / "a" / "checkpoint-1").exists()  # a shared file system: the run's main process writes
    save_checkpoint(second_machine, tmp_path / "b", LoopState(1, 0, 1), keep=None, each_node=True)
    assert (tmp_path / "b" / "checkpoint-1" / "trainer_state.json").exists()
    config = SimpleNamespace(save_on_each_node=True, tf32=None, log_level="passive", log_level_replica="passive",
                             ddp_find_unused_parameters=None, ddp_bucket_cap_mb=None, ddp_broadcast_buffers=None,
                             ddp_static_graph=None, ddp_backend=None, ddp_timeout=1800, accelerator_config=None,
                             torch_compile=False, torch_compile_backend=None)
    assert accelerator_options(config)["project_config"].save_on_each_node is True
