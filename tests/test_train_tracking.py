"""--report_to: tracker names resolved and checked; rows of metrics.jsonl reach TensorBoard (and wandb offline)."""

import importlib.util
import math

import pytest
from accelerate import Accelerator

from alignlab.errors import UserError
from alignlab.train.tracking import (
    Tracking,
    accelerator_tracking_kwargs,
    flatten_config,
    numeric_row,
    resolve_report_to,
)


def test_none_and_empty_mean_no_tracker():
    for value in (None, "none", ["none"], [], ""):
        assert resolve_report_to(value) == []


def test_names_are_split_deduplicated_and_kept_in_order():
    assert resolve_report_to("tensorboard") == ["tensorboard"]
    assert resolve_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    if importlib.util.find_spec("wandb") is not None:
        assert resolve_report_to("wandb,tensorboard") == ["wandb", "tensorboard"]
        assert resolve_report_to(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    assert "tensorboard" in resolve_report_to("all")


def test_unknown_mixed_and_missing_trackers_are_one_line_errors(monkeypatch):
    known = r"--report_to 'tensorbored' is not a known tracker: choose from none, all, tensorboard, wandb"
    with pytest.raises(UserError, match=known):
        resolve_report_to(["tensorboard", "tensorbored"])
    with pytest.raises(UserError, match="'none' and 'all' cannot be combined"):
        resolve_report_to("none tensorboard")
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    missing = r"^--report_to mlflow: the mlflow package is not installed \(pip install mlflow\)$"
    with pytest.raises(UserError, match=missing):
        resolve_report_to("mlflow")
    with pytest.raises(UserError, match=r"\(pip install comet-ml\)$"):
        resolve_report_to(["comet_ml"])


def test_config_is_flattened_and_rows_keep_numbers_only():
    class Path:  # stands for any non-scalar value: kept as its str
        def __str__(self):
            return "/data/x.jsonl"

    config = {"learning_rate": 1e-5, "beta": 0.1, "peft": {"r": 8, "target_modules": ["q", "v"]}, "seed": None,
              "bf16": False, "data": Path()}
    assert flatten_config(config) == {
        "learning_rate": 1e-5, "beta": 0.1, "peft/r": 8, "peft/target_modules": "['q', 'v']", "bf16": False,
        "data": "/data/x.jsonl",
    }
    import torch

    row = {"step": 4, "loss": 0.5, "epoch": 1, "note": "x", "kl": math.nan, "grad_norm": torch.tensor(2.0), "ids": [1]}
    out = numeric_row(row)
    assert set(out) == {"loss", "epoch", "kl", "grad_norm"}
    assert out["loss"] == 0.5 and out["epoch"] == 1.0 and out["grad_norm"] == 2.0 and math.isnan(out["kl"])


def _fake_loop(tracking, rows):
    for row in rows:
        tracking.log(row, step=row["step"])
    tracking.end_training()
    tracking.end_training()  # a second call is harmless


ROWS = [{"step": s, "loss": 1.0 / s, "rewards/margins": 0.25 * s, "lr": "n/a"} for s in (1, 2, 3)]


def test_report_to_tensorboard_writes_the_logged_scalars_at_their_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report_to = resolve_report_to("tensorboard")
    accelerator = Accelerator(cpu=True, **accelerator_tracking_kwargs(report_to, tmp_path))
    tracking = Tracking(accelerator, project_name="dpo-run", config={"learning_rate": 1e-3, "beta": 0.1})
    _fake_loop(tracking, ROWS)

    events = EventAccumulator(str(tmp_path / "runs" / "dpo-run"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "rewards/margins"]  # the string "lr" is not sent
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    margins = [(e.step, e.value) for e in events.Scalars("rewards/margins")]
    assert [s for s, _ in loss] == [1, 2, 3] and [v for _, v in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert margins == [(1, 0.25), (2, 0.5), (3, 0.75)]
    hparams = list((tmp_path / "runs" / "dpo-run").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "learning_rate: 0.001" in hparams[0].read_text()


def test_nothing_to_report_is_a_no_op(tmp_path):
    accelerator = Accelerator(cpu=True, **accelerator_tracking_kwargs(resolve_report_to("none"), tmp_path))
    tracking = Tracking(accelerator, config={"learning_rate": 1e-3})
    assert not tracking.enabled
    _fake_loop(tracking, ROWS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (optional: pip install wandb)")
def test_wandb_offline_writes_a_local_run_folder(tmp_path, monkeypatch):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "config",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    out = tmp_path / "out"
    accelerator = Accelerator(cpu=True, **accelerator_tracking_kwargs(resolve_report_to("wandb"), out))
    tracking = Tracking(accelerator, project_name="alignlab", config={"nested": {"beta": 0.1}}, run_name="dpo-1")
    _fake_loop(tracking, ROWS)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()  # protobuf records: keys and JSON values are stored as plain text
    assert b"nested/beta" in data and b"rewards/margins" in data and b"0.3333333333333333" in data
