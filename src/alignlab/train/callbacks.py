"""transformers' ``TrainerCallback`` protocol for the training loop, and TRL's ``trainer_state.json``.

The loop (:class:`~alignlab.train.loop.Trainer`) reports its events to one :class:`LoopEvents`, which keeps a
transformers ``TrainerState`` (``global_step``, ``epoch``, ``max_steps``, ``log_history``, ...) and a
``TrainerControl``, and calls the user's callbacks through transformers' own ``CallbackHandler`` with a
``TrainingArguments``-compatible ``args`` (:class:`TrainingArgumentsView`). The loop obeys what the callbacks set
in ``control``: ``should_training_stop`` ends the run after the step (it is then evaluated and saved as a run
that reached ``max_steps``), ``should_epoch_stop`` ends the epoch after the step (the next one starts; the run
still ends after its number of epochs), ``should_save`` writes a checkpoint, ``should_evaluate`` evaluates and
``should_log`` writes a row at that step. Every event of transformers' ``Trainer`` is called, in its order:
``on_init_end``, ``on_train_begin``, ``on_epoch_begin``, ``on_step_begin``, ``on_substep_end`` (after each
gradient-accumulation micro-batch but the last), ``on_pre_optimizer_step`` and ``on_optimizer_step`` (around each
optimizer step; an online step makes several), ``on_step_end``, ``on_log``, ``on_evaluate``, ``on_save``,
``on_epoch_end``, ``on_train_end``.

``state.log_history`` holds what transformers' ``Trainer.log`` would: each logged training row with TRL's names
(``loss``, ``grad_norm``, ``learning_rate``, the method's metrics, ``epoch``, ``step``), each evaluation's
``eval_*`` row, and a last row with ``train_runtime``, ``train_samples_per_second``,
``train_steps_per_second`` and ``train_loss``. It is written as ``trainer_state.json`` into ``output_dir`` and
into every checkpoint (:func:`~alignlab.train.checkpoint.save_checkpoint`), and read back on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

ALIGNLAB_ONLY = ("nonfinite_steps", "tokens_per_second")
"""``metrics.jsonl`` columns that are alignlab's own (no TRL counterpart): left out of ``log_history``."""


@functools.lru_cache(maxsize=1)
def training_arguments_defaults() -> dict[str, Any]:
    """transformers ``TrainingArguments``' fields and their defaults (as given, before its ``__post_init__``)."""
    from transformers import TrainingArguments

    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


class TrainingArgumentsView:
    """The run's config as callbacks read ``args``: the config's own fields (TRL's and ``TrainingArguments``'
    names), and ``TrainingArguments``' default for a field the config does not have (``logging_first_step``,
    ``eval_delay``, ``metric_for_best_model``, ... which transformers' built-in callbacks read). Attributes set
    on it go to the config."""

    def __init__(self, config: Any):
        object.__setattr__(self, "config", config)

    def __getattr__(self, name: str) -> Any:
        config = object.__getattribute__(self, "config")
        if hasattr(config, name):
            return getattr(config, name)
        defaults = training_arguments_defaults()
        if name in defaults:
            return defaults[name]
        raise AttributeError(f"{type(config).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.config, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The config's fields as plain values (what ``TrainingArguments.to_dict`` gives integrations)."""
        from alignlab.train.inputs import config_as_dict

        return config_as_dict(self.config)


def _quiet_handler(model, processing_class):
    """transformers' ``CallbackHandler`` without its warning about a missing ``DefaultFlowCallback``: the loop
    itself decides when to log, evaluate and save, as that callback does in transformers' ``Trainer``."""
    from transformers.trainer_callback import CallbackHandler
    from transformers.trainer_callback import logger as callback_logger

    level = callback_logger.level
    callback_logger.setLevel(logging.ERROR)
    try:
        return CallbackHandler([], model, processing_class, None, None)
    finally:
        callback_logger.setLevel(level)


class LoopEvents:
    """The callbacks, ``TrainerState`` and ``TrainerControl`` of one trainer (see the module docstring).

    Args:
        config: the run's config (``args`` of every event, through :class:`TrainingArgumentsView`).
        callbacks: ``TrainerCallback`` instances or classes (a class is instantiated, as transformers does).
        model, processing_class: passed to every event as keyword arguments.
        is_main_process: ``state.is_world_process_zero`` / ``is_local_process_zero``.

    ``on_init_end`` is called here.
    """

    def __init__(self, config: Any, callbacks=None, *, model=None, processing_class=None,
                 is_main_process: bool = True):
        from transformers import TrainerControl, TrainerState

        self.config = config
        self.args = TrainingArgumentsView(config)
        self.handler = _quiet_handler(model, processing_class)
        for callback in callbacks or []:
            self.handler.add_callback(callback)
        self.state = TrainerState(is_local_process_zero=is_main_process, is_world_process_zero=is_main_process)
        self.control = TrainerControl()
        self._logged_losses: list[tuple[float, int]] = []
        self._last_logged_step = 0
        self._call("on_init_end")

    def _call(self, event: str, **kwargs) -> Any:
        self.control = getattr(self.handler, event)(self.args, self.state, self.control, **kwargs)
        return self.control

    # -- the loop's events -----------------------------------------------------------------------------------
    def train_begin(self, *, max_steps: int, num_train_epochs: float, global_step: int, epoch: float,
                    model=None, optimizer=None, lr_scheduler=None, train_dataloader=None) -> None:
        """``on_train_begin``, with the state's run length and cadences set as transformers sets them."""
        cfg, state = self.config, self.state
        state.max_steps, state.num_train_epochs = max_steps, num_train_epochs
        state.global_step, state.epoch = global_step, epoch
        state.logging_steps = cfg.logging_steps
        state.eval_steps = cfg.eval_steps or cfg.logging_steps
        state.save_steps = cfg.save_steps
        state.train_batch_size = cfg.per_device_train_batch_size
        self._last_logged_step = global_step
        handler = self.handler
        handler.model = model if model is not None else handler.model
        handler.optimizer, handler.lr_scheduler, handler.train_dataloader = optimizer, lr_scheduler, train_dataloader
        self._call("on_train_begin")

    def epoch_begin(self) -> None:
        """``on_epoch_begin``."""
        self._call("on_epoch_begin")

    def epoch_end(self) -> None:
        """``on_epoch_end`` (also when the run ends inside an epoch, as transformers calls it)."""
        self._call("on_epoch_end")

    def step_begin(self) -> None:
        """``on_step_begin`` (it clears ``should_log``, ``should_evaluate`` and ``should_save``)."""
        self._call("on_step_begin")

    def update_event(self, event: str) -> None:
        """An event inside an optimizer update, with no state to set: ``on_substep_end`` (a micro-batch's
        backward done, the update's optimizer step still to come), ``on_pre_optimizer_step`` (the gradients
        clipped, the optimizer about to step) or ``on_optimizer_step`` (it stepped, the gradients still there).

        Raises:
            ValueError: another event name.
        """
        if event not in ("on_substep_end", "on_pre_optimizer_step", "on_optimizer_step"):
            raise ValueError(f"{event} is not an event inside an optimizer update")
        self._call(event)

    def step_end(self, global_step: int, epoch: float):
        """``on_step_end`` after optimizer step ``global_step``; returns the ``TrainerControl`` to obey."""
        self.state.global_step, self.state.epoch = global_step, epoch
        return self._call("on_step_end")

    def log(self, row: dict[str, Any]) -> None:
        """Append a ``metrics.jsonl`` row to ``log_history`` as transformers' ``Trainer.log`` does (the row's
        values, ``epoch``, then ``step``; alignlab's own columns left out) and call ``on_log`` with it."""
        step = int(row.get("step", self.state.global_step))
        logs = {k: v for k, v in row.items()
                if k not in ("step", "epoch", *ALIGNLAB_ONLY) and not k.startswith("time/")}
        if "loss" in logs and step > self._last_logged_step:
            self._logged_losses.append((float(logs["loss"]), step - self._last_logged_step))
            self._last_logged_step = step
        logs["epoch"] = row.get("epoch", self.state.epoch)
        self.state.log_history.append({**logs, "step": step})
        self._call("on_log", logs=logs)

    def evaluated(self, metrics: dict[str, float]) -> None:
        """An evaluation's ``eval_*`` metrics: logged (``log_history``, ``on_log``), then ``on_evaluate``."""
        self.log({**metrics, "step": self.state.global_step})
        self._call("on_evaluate", metrics=metrics)

    def saved(self, checkpoint: Path | None = None) -> None:
        """A checkpoint was written: ``on_save``."""
        self._call("on_save")

    def train_end(self, *, train_runtime: float, steps: int, samples_per_step: int) -> None:
        """The run's summary row (``train_runtime``, ``train_samples_per_second``, ``train_steps_per_second``,
        ``train_loss``: the mean training loss over the steps logged) and ``on_train_end``."""
        total = sum(n for _, n in self._logged_losses)
        summary = {
            "train_runtime": round(train_runtime, 4),
            "train_samples_per_second": round(steps * samples_per_step / train_runtime, 3) if train_runtime else 0.0,
            "train_steps_per_second": round(steps / train_runtime, 3) if train_runtime else 0.0,
            "train_loss": sum(loss * n for loss, n in self._logged_losses) / total if total else float("nan"),
        }
        self.log({**summary, "step": self.state.global_step, "epoch": self.state.epoch})
        self._call("on_train_end")

    # -- trainer_state.json ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ``TrainerState`` as ``trainer_state.json`` holds it."""
        return dataclasses.asdict(self.state)

    def write_state(self, folder: str | Path) -> Path:
        """Write ``folder/trainer_state.json`` (transformers' ``TrainerState.save_to_json``)."""
        path = Path(folder) / "trainer_state.json"
        self.state.save_to_json(str(path))
        return path

    def resume(self, checkpoint: str | Path) -> None:
        """Take ``log_history`` (and the best-metric fields) back from a checkpoint's ``trainer_state.json``;
        rows logged after the checkpoint's step are dropped, as ``metrics.jsonl``'s are."""
        try:
            data = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return
        step = int(data.get("global_step", 0))
        self.state.log_history = [row for row in data.get("log_history", []) if row.get("step", 0) <= step]
        for key in ("best_metric", "best_model_checkpoint", "best_global_step"):
            if key in data:
                setattr(self.state, key, data[key])
        self._logged_losses = []
        last = 0
        for row in self.state.log_history:
            if "loss" in row and row["step"] > last:
                self._logged_losses.append((float(row["loss"]), row["step"] - last))
                last = row["step"]
        self._last_logged_step = last
