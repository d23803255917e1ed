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
    trainer = _dpo_trainer(tiny_model_dir, pairs_file, tmp_path / "run")
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
            "--max_steps", "3", "--save_steps", "0", "--bf16", "false", "--sample_steps", "1", *extra]


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

