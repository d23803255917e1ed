"""The output folder: an earlier run's files are never deleted or rewritten by a later run until it has saved
what replaces them; a refused run touches nothing; a failed run leaves the folder as it found it, apart from its
failure log (alignlab.train.output_dir, docs/faults.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import one_line, read_metrics, run_cli

FAILING_REWARD = (
    "def bad(prompts, completions, **kw):\n"
    "    raise RuntimeError('the scorer is down')\n"
)

# SIGINT (a Ctrl-C) while step 2 is scored, once: the marker file says it was sent
INTERRUPTING_REWARD = (
    "import os, signal\n"
    "calls = 0\n"
    "def once(prompts, completions, **kw):\n"
    "    global calls\n"
    "    calls += 1\n"
    "    marker = os.path.join(os.path.dirname(__file__), 'interrupted')\n"
    "    if calls == 2 and not os.path.exists(marker):\n"
    "        open(marker, 'w').close()\n"
    "        os.kill(os.getpid(), signal.SIGINT)\n"
    "    return [-float(len(c[0]['content'])) / 10 for c in completions]\n"
)


def checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (hidden ones too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _dpo(capsys, model, data, out, *extra) -> None:
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir",
                           str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1",
                           "--logging_steps", "1", "--bf16", "false", "--max_length", "64", *extra)
    assert code == 0, err


def _grpo(capsys, model, data, out, reward, *extra) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "grpo", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir",
                           str(out), "--reward_funcs", reward, "--per_device_train_batch_size", "4",
                           "--num_generations", "4", "--max_completion_length", "6", "--max_steps", "2",
                           "--save_steps", "0", "--bf16", "false", "--logging_steps", "1", *extra)
    return code, err


def test_a_finished_run_survives_a_refused_run_and_a_failed_one_and_is_replaced_by_a_saved_one(
        capsys, tiny_model_dir, pairs_file, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    _dpo(capsys, tiny_model_dir, pairs_file, out)
    before = checksums(out)
    assert {"model.safetensors", "metrics.jsonl", "config.yaml", "checkpoint-1/trainer_state.json"} <= set(before)
    bad = tmp_path / "bad.py"
    bad.write_text(FAILING_REWARD)

    # without --overwrite_output_dir: refused, before any model is loaded
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{rewards_file}:short")
    assert code == 1
    assert one_line(err) == (
        f"alignlab grpo: error: --output_dir {out} holds a trained model (model.safetensors): pass "
        "--overwrite_output_dir to replace it (its files are replaced only when the new run saves its model), or "
        "choose another --output_dir")
    assert checksums(out) == before

    # with it, a run that fails at its first step: the finished run's files are as they were, plus the log
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{bad}:bad", "--overwrite_output_dir")
    assert code == 1
    assert one_line(err) == f"alignlab grpo: error: reward function {bad}:bad raised RuntimeError: the scorer is down"
    after = checksums(out)
    log = after.pop("failed-run.log")
    assert after == before and log
    text = (out / "failed-run.log").read_text()
    assert text.startswith(f"error: reward function {bad}:bad raised RuntimeError: the scorer is down\n")
    assert "the earlier run's files are as they were" in text
    assert not (out / ".alignlab-staging").exists()

    # a run that saves replaces them: the DPO run's checkpoints, metrics and failure log are gone
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{rewards_file}:short", "--overwrite_output_dir")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("checkpoint-") for n in names) and "failed-run.log" not in names
    assert not {".alignlab-staging", ".alignlab-replaced"} & names
    assert yaml.safe_load((out / "config.yaml").read_text())["num_generations"] == 4  # GRPO's config
    assert [r["step"] for r in read_metrics(out)] == [1, 2] and "reward" in read_metrics(out)[0]
    assert checksums(out)["model.safetensors"] != before["model.safetensors"]


def test_a_rerun_into_a_finished_run_is_refused(capsys, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    _dpo(capsys, tiny_model_dir, pairs_file, out)
    before = checksums(out)
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file),
                           "--output_dir", str(out), "--max_steps", "2")
    assert code == 1 and "holds a trained model (model.safetensors)" in one_line(err)
    assert checksums(out) == before
    # resuming the run's own checkpoint is not a new run: allowed, in place
    _dpo(capsys, tiny_model_dir, pairs_file, out, "--resume_from_checkpoint", "true")


def test_a_run_that_fails_at_step_1_in_a_new_folder_leaves_only_its_log(capsys, tiny_model_dir, prompts_file,
                                                                        rewards_file, tmp_path):
    out = tmp_path / "new"
    bad = tmp_path / "bad.py"
    bad.write_text(FAILING_REWARD)
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{bad}:bad")
    assert code == 1 and "the scorer is down" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == [".alignlab.lock", "failed-run.log"]
    assert (out / ".alignlab.lock").read_text() == ""  # released
    assert "nothing of the run is kept" in (out / "failed-run.log").read_text()
    # the folder holds no earlier run: the next run starts there, and its success removes the old log
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{rewards_file}:short")
    assert code == 0, err
    assert not (out / "failed-run.log").exists() and (out / "model.safetensors").exists()


def test_an_interrupted_run_over_an_earlier_one_resumes_from_its_staging_folder(
        capsys, tiny_model_dir, pairs_file, prompts_file, tmp_path):
    out = tmp_path / "run"
    _dpo(capsys, tiny_model_dir, pairs_file, out)
    before = checksums(out)
    rewards = tmp_path / "rewards.py"
    rewards.write_text(INTERRUPTING_REWARD)
    with pytest.raises(SystemExit) as info:  # TrainingInterrupted: the CLI exits with it
        _grpo(capsys, tiny_model_dir, prompts_file, out, f"{rewards}:once", "--save_steps", "1", "--max_steps", "3",
              "--overwrite_output_dir")
    assert info.value.code == 130
    staging = out / ".alignlab-staging"
    assert info.value.checkpoint == staging / "checkpoint-2"
    assert {k: v for k, v in checksums(out).items() if not k.startswith(".alignlab-staging")} == before
    capsys.readouterr()
    # `true` finds the staged run's checkpoint (not the DPO run's checkpoint-1), and its save replaces the DPO run
    code, err = _grpo(capsys, tiny_model_dir, prompts_file, out, f"{rewards}:once", "--save_steps", "1",
                      "--max_steps", "3", "--resume_from_checkpoint", "true")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3] and "reward" in read_metrics(out)[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # the GRPO run's
    assert checksums(out)["checkpoint-1/model.safetensors"] != before["checkpoint-1/model.safetensors"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not staging.exists()


def test_a_move_cut_short_is_finished_by_the_next_run(tmp_path):
    from alignlab.train.config import TrainConfig
    from alignlab.train.output_dir import OutputFolder

    out = tmp_path / "run"
    (out / ".alignlab-staging").mkdir(parents=True)
    (out / ".alignlab-staging" / "model.safetensors").write_text("new")
    (out / ".alignlab-staging" / "metrics.jsonl").write_text("{\"step\": 1}\n")
    (out / ".alignlab-replaced").mkdir()
    (out / ".alignlab-replaced" / ".moved").touch()
    (out / ".alignlab-replaced" / "model.safetensors").write_text("old")
    (out / "config.json").write_text("{}")  # moved in before the crash
    cfg = TrainConfig(output_dir=str(out), dataset_name="x.jsonl", overwrite_output_dir=True, bf16=False)
    with OutputFolder(cfg) as folder:
        assert folder.work_dir == out / ".alignlab-staging"  # the finished run counts as an earlier one
    assert (out / "model.safetensors").read_text() == "new" and (out / "config.json").exists()
    assert not (out / ".alignlab-replaced").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_dir_that_cannot_be_written_is_one_line(capsys, tmp_path, pairs_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "dpo", "--dataset_name", str(pairs_file), "--output_dir", str(locked / "run"))
    finally:
        locked.chmod(0o755)
    assert code == 1 and one_line(err) == (f"alignlab dpo: error: --output_dir {locked / 'run'}: {locked} cannot be "
                                           "written (permission denied)")


@pytest.mark.parametrize("command", ["dpo", "compare", "evaluate"])
def test_an_output_path_that_is_a_file_or_a_folder_is_one_line(command, capsys, tmp_path, pairs_file, prompts_file):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    if command == "evaluate":  # its --output_file must be a file, not a folder
        argv = ["--dataset_name", str(prompts_file), "--reward_funcs", "m:f", "--output_file", str(tmp_path)]
        expected = f"--output_file {tmp_path} is a folder, not a file"
    else:
        argv = ["--dataset_name" if command == "dpo" else "--task", str(pairs_file if command == "dpo" else prompts_file),
                "--output_dir", str(a_file / "sub" if command == "compare" else a_file)]
        expected = (f"--output_dir {a_file / 'sub'}: {a_file} is a file, not a folder" if command == "compare"
                    else f"--output_dir {a_file} is a file, not a folder")
    code, _, err = run_cli(capsys, command, *argv)
    assert code == 1 and one_line(err) == f"alignlab {command}: error: {expected}"
    assert a_file.read_text() == "x"


def test_compare_runs_its_methods_with_overwrite_output_dir(tmp_path):
    # compare owns its methods' folders: a failed method is trained again into the same folder (--resume)
    from alignlab.experiments.compare import Compare, CompareConfig

    run = Compare(CompareConfig(output_dir=str(tmp_path), task="arithmetic", preset="smoke", methods=["dpo"]))
    assert run.method_args("dpo")["overwrite_output_dir"] is True


def test_earlier_run_and_refusal_name_what_is_there(tmp_path):
    from alignlab.train.output_dir import earlier_run, refusal

    out = tmp_path / "o"
    assert earlier_run(out) is None and refusal(out, False, None) is None
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run's file
    assert earlier_run(out) is None
    (out / "metrics.jsonl").write_text("")
    assert earlier_run(out) == "an earlier run's metrics.jsonl"
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert earlier_run(out) == "the checkpoints of an unfinished run (newest: checkpoint-3)"
    assert "resume it with --resume_from_checkpoint true" in refusal(out, False, None)
    assert refusal(out, True, None) is None and refusal(out, False, "true") is None
