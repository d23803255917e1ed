"""The one training loop every algorithm shares.

It owns gradient accumulation, the optimizer and schedule, gradient clipping, logging to ``metrics.jsonl``,
evaluation, plots, checkpoints (atomic) and resuming; precision, distribution and the CPU speed layer come from
the run's :class:`~alignlab.train.runtime.Runtime` (entered once around the run). An algorithm supplies a loss
function (:data:`~alignlab.train.steps.LossFn`: a sequence of loss terms) and its data; nothing else. Its parts:
:mod:`~alignlab.train.steps` (one optimizer update), :mod:`~alignlab.train.window` (the logging window),
:mod:`~alignlab.train.checkpoint`; what it hands back is in :mod:`~alignlab.train.types`.

Both shapes of step come down to optimizer updates, each a list of micro-batches:

* offline (SFT, reward, DPO): ``gradient_accumulation_steps`` data-loader batches make one update, and one
  update is one ``global_step``;
* online (PPO, GRPO, Online DPO): each data-loader batch is a batch of prompts handed to the algorithm's
  ``rollout_fn``, which samples, scores and returns a :class:`Rollout`: a list of updates. One rollout and all
  its updates are one ``global_step`` (TRL PPO's "update"); the learning-rate schedule advances once per
  ``global_step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from alignlab.errors import UserError
from alignlab.models import save_pretrained
from alignlab.train.checkpoint import (  # noqa: F401 - re-exported: the loop's public names
    STATE_FILE, LoopState, find_latest_checkpoint, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
)
from alignlab.train.callbacks import LoopEvents
from alignlab.train.inputs import config_as_dict
from alignlab.train.output_dir import OutputFolder
from alignlab.train.setup import EVAL_SET
from alignlab.train.config import TrainConfig
from alignlab.train.metrics import MetricsLog, plot_metrics
from alignlab.train.model_card import write_model_card
from alignlab.train.steps import (
    LossFn, NonfiniteSteps, all_finite, evaluate_terms, guarded_optimizer_step, offloading, run_update,
)
from alignlab.train.runtime import Runtime
from alignlab.train.schedule import Cadence, build_optimizer, build_scheduler, loader_options, sync_reference
from alignlab.train.tracking import Tracking
from alignlab.train.types import Rollout, TrainResult
from alignlab.train.window import MetricsWindow

logger = logging.getLogger(__name__)

def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split for AdamW: matrices decay, vectors (biases, norm weights) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainingInterrupted(SystemExit):
    """The run stopped on SIGTERM or SIGINT after writing a checkpoint of its last completed step. A
    ``SystemExit`` whose code is the shell's for the signal (``128 + signum``: 143 for SIGTERM, 130 for SIGINT),
    so the ``alignlab`` command exits with it; ``checkpoint`` is the checkpoint written (or found)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """SIGTERM and SIGINT, caught for the length of a run (a context manager): the first one only sets
    :attr:`signum`, and the loop stops at the end of the step under way, after a checkpoint (pre-emption: a
    scheduler's SIGTERM, a Ctrl-C). A second one of the same kind does not wait, and neither does the first once
    ``grace_period`` seconds have passed without the step ending (a hung step: the timer sends the signal again):
    SIGINT raises ``KeyboardInterrupt``, SIGTERM exits with status 143 at once; the checkpoints written so far
    are complete (each is written aside and renamed into place). The previous handlers come back on exit.
    Installed only in the main thread (Python delivers signals there; elsewhere this does nothing).

    Args:
        grace_period: seconds (``None``: no limit; 0: the first signal stops at once).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_period: float | None = None):
        self.signum: int | None = None
        self.grace_period = grace_period
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._guard = threading.Lock()  # the timer never re-sends a signal once the handlers are put back
        self._expired = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum == signum or self.grace_period == 0:  # asked twice, or the grace period is over: stop now
            why = (f"the step did not end within --stop_grace_period {self.grace_period:g} s" if self._expired
                   else "asked twice" if self.grace_period else "--stop_grace_period 0")
            print(f"training stopped at once by {name} in the middle of a step ({why}); the checkpoints written "
                  "before it are complete", file=sys.stderr, flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        if not self.grace_period:
            logger.warning("%s received: stopping after the current step (send it again to stop at once)", name)
        else:
            logger.warning("%s received: stopping after the current step (at most %g s more; send it again to stop "
                           "at once)", name, self.grace_period)
            self._timer = threading.Timer(self.grace_period, self._resend, args=(signum,))
            self._timer.daemon = True
            self._timer.start()

    def _resend(self, signum: int) -> None:
        with self._guard:
            if self._previous:
                self._expired = True
                os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        with self._guard:
            if self._timer is not None:
                self._timer.cancel()
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()


class Trainer:
    """Runs the optimisation for one algorithm.

    Args:
        config: the algorithm's config (a :class:`TrainConfig`).
        runtime: the run's :class:`~alignlab.train.runtime.Runtime` (from
            :func:`~alignlab.train.runtime.build_runtime`).
        model: the trained model (trainable parameters have ``requires_grad``), LoRA already applied if wanted.
        tokenizer: saved with the model.
        train_dataset: a sequence of examples (offline: for ``collate_fn``; online: prompts for ``rollout_fn``).
        collate_fn: list of examples -> batch dict of tensors (with ``attention_mask`` for token counting).
        loss_fn: see :data:`~alignlab.train.steps.LossFn`; called under autocast, with the prepared (possibly
            DDP-wrapped) model.
        eval_dataset: optional held-out examples (offline algorithms).
        plot_panels: file stem -> metric names, for ``plots/*.png``.
        rollout_fn: ``rollout_fn(model, prompts, step) -> Rollout``, called without gradients with the model in
            eval mode (``step`` is the 1-based ``global_step`` being built); makes the loop online (module
            docstring). The data loader then yields lists of examples (``collate_fn`` is ignored) and drops a
            last incomplete batch.
        rollout_batch_size: examples per process per rollout (default ``per_device_train_batch_size``).
        model_to_save: picks what to save from the trained (unwrapped) model, e.g. the policy out of a
            policy-and-value module. Default: the model itself.
        events: the callbacks and ``TrainerState`` (:class:`~alignlab.train.callbacks.LoopEvents`; default: no
            callbacks, the state still kept and written as ``trainer_state.json``).
        eval_rollout_fn: online evaluation: ``eval_rollout_fn(model, prompts) -> (batch, metrics)`` samples and
            scores a batch of ``eval_batch_size`` eval prompts (called without gradients, model in eval mode);
            ``loss_fn`` then runs on ``batch``, and ``metrics`` join the ``eval_*`` means.
        eval_batch_size: eval examples per process per batch (default ``per_device_eval_batch_size``).
        ref_model: the frozen reference model, updated towards the policy with ``sync_ref_model``.

    Raises:
        UserError: an empty training set, or fewer prompts than one rollout takes.
    """

    def __init__(
        self,
        config: TrainConfig,
        runtime: Runtime,
        model: torch.nn.Module,
        tokenizer,
        train_dataset,
        *,
        collate_fn: Callable,
        loss_fn: LossFn,
        eval_dataset=None,
        plot_panels: dict[str, list[str]] | None = None,
        rollout_fn: Callable[[torch.nn.Module, list, int], Rollout] | None = None,
        rollout_batch_size: int | None = None,
        model_to_save: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        events: LoopEvents | None = None,
        eval_rollout_fn: Callable[[torch.nn.Module, list], tuple[dict, dict]] | None = None,
        eval_batch_size: int | None = None,
        ref_model: torch.nn.Module | None = None,
    ):
        from transformers.trainer_utils import TrainerMemoryTracker

        self._memory = TrainerMemoryTracker(getattr(config, "skip_memory_metrics", True))  # transformers' metrics
        self._memory.start()
        if len(train_dataset) == 0:
            raise UserError(f"the training set ({config.dataset_name}) is empty after preprocessing")
        self.rollout_fn = rollout_fn
        self.batch_size = rollout_batch_size or config.per_device_train_batch_size
        if rollout_fn is not None and len(train_dataset) < self.batch_size:
            raise UserError(
                f"one rollout takes {self.batch_size} prompts per process but the training set has only "
                f"{len(train_dataset)}"
            )
        self.model_to_save = model_to_save or (lambda m: m)
        self.ref_model = ref_model
        if getattr(config, "sync_ref_model", False) and ref_model is None:
            raise UserError("--sync_ref_model needs a reference model, and this run has none (a reference-free "
                            "loss, --beta 0, or --use_peft)")
        self.config = config
        self.runtime = runtime
        self.accelerator = self.runtime.accelerator
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) else None
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn
        self.eval_rollout_fn = eval_rollout_fn
        self.eval_batch_size = eval_batch_size or config.per_device_eval_batch_size
        self.plot_panels = {"loss": ["loss"], **(plot_panels or {})}
        self.output_dir = Path(config.output_dir)
        self._use_work_dir(self.output_dir)
        self._eval_loader = None
        self.events = events or LoopEvents(config, model=model, processing_class=tokenizer,
                                           is_main_process=self.accelerator.is_main_process)
        self._memory.stop_and_update_metrics()

    def _use_work_dir(self, work_dir: Path) -> None:
        """Write the run's files (metrics, samples, config, plots, checkpoints, the model) into ``work_dir``:
        ``output_dir`` or its staging folder (:class:`~alignlab.train.output_dir.OutputFolder`)."""
        self.work_dir = Path(work_dir)
        self.metrics = MetricsLog(self.work_dir / "metrics.jsonl")
        self.samples_path = self.work_dir / "samples.jsonl"

    # ------------------------------------------------------------------------------------------------------
    def _precision(self):
        return self.runtime.precision()

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.runtime.gather(value)

    def _loader(self, dataset, batch_size: int, shuffle: bool, online: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=list if online else self.collate_fn,
            **loader_options(self.config, shuffle=shuffle, online=online, device=self.runtime.device),
        )

    def eval_sets(self) -> dict[str, list]:
        """The eval examples by metric prefix: ``{"eval": examples}``, or with several eval sets (examples
        carrying :data:`~alignlab.train.setup.EVAL_SET`) ``{"eval_NAME": that set's examples, ...}`` in the order
        the sets were given (transformers' ``metric_key_prefix``)."""
        sets: dict[str, list] = {}
        for example in self.eval_dataset or []:
            name = example.get(EVAL_SET) if isinstance(example, dict) else None
            sets.setdefault("eval" if name is None else f"eval_{name}", []).append(example)
        return sets

    def evaluate(self, model, step: int, record: bool = True) -> dict[str, float]:
        """Mean loss and metrics over each eval set (all processes), logged as ``eval_*`` (several sets:
        ``eval_NAME_*`` each, :meth:`eval_sets`) with ``eval_runtime`` at ``step`` (in ``metrics.jsonl`` when
        ``record``)."""
        if self._eval_loader is None:
            self._eval_loader = {prefix: self.accelerator.prepare(self._loader(examples, self.eval_batch_size, False))
                                 for prefix, examples in self.eval_sets().items()}
        was_training = model.training
        model.eval()
        result = {}
        for prefix, loader in self._eval_loader.items():
            window = MetricsWindow(self._gather)
            start = time.perf_counter()
            for batch in loader:
                if self.eval_rollout_fn is not None:  # online: sample and score the prompts, then the loss on them
                    with torch.no_grad():
                        batch, sampled = self.eval_rollout_fn(model, batch)
                    window.add_all(sampled)
                loss, metrics = evaluate_terms(self._precision, self.loss_fn, model, batch)
                window.add("loss", loss)
                window.add_all(metrics)
            result.update({f"{prefix}_{k}": v for k, v in window.means().items()})
            result[f"{prefix}_runtime"] = time.perf_counter() - start
        if was_training:
            model.train()
        if record and self.accelerator.is_main_process:
            self.metrics.append({"step": step, **result})
        return result

    def save_model(self, output_dir: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Save ``model`` (default: the trained model; prepared or not) and the tokenizer into ``output_dir``
        (every process calls it: a sharded model is gathered; the main process writes). Returns what was saved
        (``model_to_save`` of the unwrapped model)."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model if model is None else model)
        to_save = self.model_to_save(unwrapped)
        state_dict = self.runtime.full_state_dict(unwrapped, to_save)  # sharded: every process takes part
        if acc.is_main_process:
            save_pretrained(to_save, self.tokenizer, output_dir, merge_lora=self.config.merge_lora,
                            state_dict=state_dict)
        return to_save

    # ------------------------------------------------------------------------------------------------------
    def _update(self, model, optimizer, micro_batches: list[dict], window: MetricsWindow, step: int) -> torch.Tensor:
        """Forwards, backwards and the optimizer step of one update; an update whose loss or gradient is not
        finite is skipped and counted (:func:`~alignlab.train.steps.guarded_optimizer_step`). Returns the grad
        norm.

        Raises:
            UserError: more than ``max_nonfinite_steps`` updates were skipped.
        """
        losses = []

        def record(loss, metrics):
            losses.append(loss)
            window.add("loss", loss)
            window.add_all(metrics)

        precision = self._precision
        if getattr(self.config, "activation_offloading", False):  # TRL's: saved activations in CPU memory
            precision = offloading(self._precision, pin_memory=self.accelerator.device.type == "cuda")
        event = self.events.update_event  # transformers' on_substep_end, on_pre_optimizer_step, on_optimizer_step
        window.tokens += run_update(self.accelerator, precision, self.loss_fn, model, micro_batches, record,
                                    substep_end=lambda: event("on_substep_end"))
        grad_norm, stepped = guarded_optimizer_step(self.runtime, model, optimizer, self.config.max_grad_norm,
                                                    losses_finite=all_finite(self.accelerator, losses),
                                                    before_step=lambda: event("on_pre_optimizer_step"),
                                                    after_step=lambda: event("on_optimizer_step"))
        if not stepped:
            over = self.nonfinite.record()
            logger.warning("step %d: non-finite loss or gradient (grad_norm %s), update skipped (%d so far)",
                           step, float(grad_norm), self.nonfinite.count)
            if over:
                latest = find_latest_checkpoint(self.work_dir)
                raise UserError(
                    f"{self.nonfinite.count} updates had a non-finite loss or gradient, more than "
                    f"--max_nonfinite_steps {self.config.max_nonfinite_steps}; stopped at step {step}, "
                    f"last checkpoint: {latest if latest else 'none'}"
                )
        return grad_norm

    def _offline_step(self, model, optimizer, micro_batches: list[dict], window: MetricsWindow,
                      step: int = 0) -> torch.Tensor:
        """One optimizer update from ``gradient_accumulation_steps`` data-loader batches; returns the grad norm."""
        return self._update(model, optimizer, micro_batches, window, step)

    def _online_step(self, model, optimizer, prompts: list, step: int, window: MetricsWindow) -> torch.Tensor:
        """One rollout and its updates; returns the last update's grad norm."""
        acc = self.accelerator
        model.eval()
        with torch.no_grad():
            rollout = self.rollout_fn(model, prompts, step)
        model.train()
        window.add_all(rollout.metrics)
        if rollout.samples and acc.is_main_process:
            with open(self.samples_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rollout.samples)
        start = time.perf_counter()
        grad_norm = torch.tensor(0.0)
        for micro_batches in rollout.updates:
            batches = [{**batch, **rollout.scalars} for batch in micro_batches]
            grad_norm = self._update(model, optimizer, batches, window, step)
        seconds = time.perf_counter() - start
        window.train_seconds += seconds
        window.add("time/training", seconds)
        return grad_norm

    def _updates(self, loader, online: bool):
        """The loader's items grouped into optimizer updates: one prompt batch (online), or
        ``gradient_accumulation_steps`` micro-batches (offline; fewer at the end of an epoch)."""
        if online:
            yield from loader
            return
        batches = iter(loader)
        while True:
            group = list(islice(batches, self.config.gradient_accumulation_steps))
            if not group:
                return
            yield group

    # ------------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run to ``max_steps`` (or ``num_train_epochs``), then evaluate, save the model (with its model card)
        and draw plots. The main process holds ``output_dir``'s lock for the length of the run; what is written
        where, and what a failure leaves, is :class:`~alignlab.train.output_dir.OutputFolder`'s.

        SIGTERM and SIGINT stop the run after the step under way, with a checkpoint of it (:class:`StopSignals`);
        reward functions have ``--reward_timeout`` seconds per call.

        Raises:
            UserError: another live run holds ``output_dir``; it holds an earlier run (without
                ``--overwrite_output_dir``); a bad ``--resume_from_checkpoint``; more than ``max_nonfinite_steps``
                updates skipped for a non-finite loss or gradient; a reward function that timed out.
            TrainingInterrupted: SIGTERM or SIGINT; the checkpoint is written.
        """
        from alignlab.rollout.rewards import reward_timeout

        cfg = self.config
        with OutputFolder(cfg, self.accelerator) as self.folder, self.runtime.training(), \
                StopSignals(cfg.stop_grace_period) as self._signals, reward_timeout(cfg.reward_timeout):
            self._use_work_dir(self.folder.work_dir)
            project = {} if cfg.project == "huggingface" else {"project_name": cfg.project}  # unset: "alignlab"
            tracking = Tracking(self.accelerator, config=config_as_dict(self.config),
                                run_name=cfg.run_name or self.output_dir.name, **project)
            memory: dict[str, float] = {}  # with --skip_memory_metrics false: transformers' *_mem_* metrics
            self._memory.start()
            try:
                result = self._train(tracking)
            finally:
                tracking.end_training()
                self._memory.stop_and_update_metrics(memory)
        if memory and self.accelerator.is_main_process:
            self.metrics.append({"step": result.global_step, **memory})
        result.train_metrics.update(memory)
        return result

    def _setup(self, online: bool):
        """Optimizer, schedule, prepared model and loader, and the step count."""
        cfg, acc = self.config, self.accelerator
        self.runtime.auto_checkpointing(self.model, self.train_dataset, self.collate_fn, online=online)
        train_loader = self._loader(self.train_dataset, self.batch_size, True, online=online)
        optimizer = build_optimizer(cfg, self.model, parameter_groups(self.model, cfg.weight_decay))
        model, optimizer, train_loader = self.runtime.prepare(self.model, optimizer, train_loader)
        per_step = 1 if online else cfg.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(len(train_loader) / per_step))
        total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        scheduler = build_scheduler(cfg, optimizer, total_steps)
        acc.register_for_checkpointing(scheduler)
        return model, optimizer, scheduler, train_loader, per_step, steps_per_epoch, total_steps

    def _start(self) -> LoopState:
        """A fresh start or the state of the checkpoint to resume from (:attr:`OutputFolder.resume`)."""
        acc = self.accelerator
        resume = self.folder.resume
        if resume is None:
            return LoopState()
        state = load_checkpoint(acc, resume)
        self.events.resume(resume)
        if acc.is_main_process:  # rows the interrupted run wrote after the checkpoint come again
            self.metrics.truncate_after(state.global_step)
            MetricsLog(self.samples_path).truncate_after(state.global_step)
        logger.info("resumed from %s at step %d", resume, state.global_step)
        return state

    def _train(self, tracking: Tracking) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            with open(self.work_dir / "config.yaml", "w", encoding="utf-8") as handle:
                yaml.safe_dump(config_as_dict(cfg), handle, sort_keys=False)
        online = self.rollout_fn is not None
        model, optimizer, scheduler, train_loader, per_step, steps_per_epoch, total_steps = self._setup(online)
        self.nonfinite = NonfiniteSteps(cfg.max_nonfinite_steps)
        acc.register_for_checkpointing(self.nonfinite)  # before _start: a resumed run goes on counting
        state = self._start()
        done_rows = self.metrics.rows() if acc.is_main_process and state.global_step else []
        window = MetricsWindow(self._gather, num_tokens=int(done_rows[-1].get("num_tokens", 0)) if done_rows else 0)
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        train_start = time.perf_counter()
        bar = tqdm(total=total_steps, initial=state.global_step, disable=not acc.is_main_process or cfg.disable_tqdm,
                   desc="training", unit="step")
        cadence = Cadence.from_config(cfg, total_steps)
        if cfg.logging_nan_inf_filter:
            window.finite_only.add("loss")
        if cfg.eval_on_start and self.eval_dataset is not None and not state.global_step:
            last_eval = self.evaluate(model, 0)
        model.train()
        skip = 0 if cfg.ignore_data_skip else state.steps_in_epoch
        events = self.events
        events.train_begin(max_steps=total_steps, num_train_epochs=cfg.num_train_epochs, global_step=state.global_step,
                           epoch=state.epoch + state.steps_in_epoch / steps_per_epoch, model=model,
                           optimizer=optimizer, lr_scheduler=scheduler, train_dataloader=train_loader)
        epoch_count = math.ceil(total_steps / steps_per_epoch)  # transformers' num_train_epochs loop
        is_last = False
        try:
            while state.global_step < total_steps:
                train_loader.set_epoch(state.epoch)
                loader = acc.skip_first_batches(train_loader, skip * per_step) if skip else train_loader
                state.steps_in_epoch, skip = skip, 0
                events.epoch_begin()
                for update in self._updates(loader, online):
                    events.step_begin()
                    if online:
                        grad_norm = self._online_step(model, optimizer, update, state.global_step + 1, window)
                    else:
                        grad_norm = self._offline_step(model, optimizer, update, window, state.global_step + 1)
                    scheduler.step()
                    self.runtime.after_optimizer_step()
                    state.global_step += 1
                    state.steps_in_epoch += 1
                    bar.update(1)
                    epoch_end = state.steps_in_epoch >= steps_per_epoch
                    cadence.after_step(state.global_step)
                    if getattr(cfg, "sync_ref_model", False) and state.global_step % cfg.ref_model_sync_steps == 0:
                        sync_reference(self.model_to_save(acc.unwrap_model(model)), self.ref_model,
                                       cfg.ref_model_mixup_alpha)
                    epoch = round(state.epoch + state.steps_in_epoch / steps_per_epoch, 4)
                    control = events.step_end(state.global_step, epoch)  # a callback can stop, log, save, evaluate
                    is_last = state.global_step >= total_steps or control.should_training_stop
                    if cadence.log(state.global_step, epoch_end, is_last) or control.should_log:
                        row = {"step": state.global_step, "epoch": epoch}
                        row.update(window.row(online=online))
                        row["learning_rate"] = scheduler.get_last_lr()[0]
                        row["grad_norm"] = float(grad_norm)
                        row["nonfinite_steps"] = self.nonfinite.count
                        if cfg.include_num_input_tokens_seen not in ("no", False):
                            row["num_input_tokens_seen"] = row.get("num_tokens")
                        if acc.is_main_process:
                            self.metrics.append(row)
                        tracking.log(row, state.global_step)
                        events.log(row)
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
                        last_train = row
                    epochs = state.epoch + state.steps_in_epoch / steps_per_epoch
                    if self.eval_dataset is not None and not is_last and (
                            cadence.evaluate(state.global_step, epochs, epoch_end) or control.should_evaluate):
                        last_eval = self.evaluate(model, state.global_step)
                        events.evaluated(last_eval)
                        window.restart_clock()
                    saved = not is_last and (cadence.save(state.global_step, epoch_end) or control.should_save)
                    if saved:
                        self._save_checkpoint(state)
                        window.restart_clock()
                    if not is_last and self._stop_requested():
                        self._stop(state, saved)
                    if is_last or events.control.should_training_stop:  # a callback may stop it in on_log
                        break
                    if events.control.should_epoch_stop:  # a callback ends the epoch: on to the next one
                        break
                if is_last or events.control.should_training_stop:
                    events.epoch_end()
                    break
                events.epoch_end()
                state.epoch += 1
                if state.epoch >= epoch_count:  # the epochs ended early by callbacks: as transformers, no more
                    break
        finally:
            bar.close()  # ends the bar's line, so an error message starts on its own
        train_seconds = time.perf_counter() - train_start

        if self.eval_dataset is not None:
            last_eval = self.evaluate(model, state.global_step)
            tracking.log(last_eval, state.global_step)
            events.evaluated(last_eval)
        acc.wait_for_everyone()
        plots: list[Path] = []
        to_save = self.save_model(self.work_dir, model)
        events.train_end(train_runtime=train_seconds, steps=state.global_step,
                         samples_per_step=self.batch_size * per_step * acc.num_processes)
        if acc.is_main_process:
            events.write_state(self.work_dir)
            self._write_model_card(to_save, {**last_train, **last_eval})
            plots = plot_metrics(self.metrics.rows(), self.work_dir / "plots", self.plot_panels)
            plots = [self.folder.final_path(p) for p in plots]
            self.folder.publish()  # a run over an earlier one: its files replace the earlier run's now
        acc.wait_for_everyone()
        self.model = acc.unwrap_model(model)
        self._use_work_dir(self.output_dir)
        return TrainResult(
            output_dir=self.output_dir,
            metrics_path=self.metrics.path,
            plots=plots,
            global_step=state.global_step,
            train_metrics=last_train,
            eval_metrics=last_eval,
            train_seconds=train_seconds,
        )

    def _write_model_card(self, model, final_metrics: dict[str, float]) -> None:
        """``README.md`` beside the saved model: base model, method, data, settings, final metrics, command."""
        import shlex
        import sys

        from alignlab.models import is_peft_model

        cfg = self.config
        data = cfg.dataset_name if isinstance(cfg.dataset_name, list) else [cfg.dataset_name]
        write_model_card(
            self.work_dir, base_model=cfg.model_name_or_path or "SmolLM2-135M-Instruct (embedded)",
            method=type(cfg).__name__.removesuffix("Config"), datasets=[str(d) for d in data if d],
            hyperparameters={k: v for k, v in config_as_dict(cfg).items() if not isinstance(v, (dict, list)) or v},
            final_metrics={k: v for k, v in final_metrics.items() if isinstance(v, (int, float))},
            command_line=shlex.join(["alignlab", *sys.argv[1:]] if "alignlab" in sys.argv[0] else sys.argv),
            peft=is_peft_model(model) and not cfg.merge_lora,
        )

    def _stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT came (on any process: every process stops at the same step)."""
        signals = getattr(self, "_signals", None)
        signum = float(signals.signum or 0) if signals is not None else 0.0
        if self.accelerator.num_processes > 1:
            signum = float(self._gather(torch.tensor([signum])).max())
        if signum and signals is not None and not signals.signum:
            signals.signum = int(signum)
        return bool(signum)

    def _stop(self, state: LoopState, saved: bool) -> None:
        """Write the checkpoint of the last completed step (unless this step's was just written), say so on one
        line, and raise :class:`TrainingInterrupted`."""
        signum = self._signals.signum
        if not saved or getattr(self.config, "save_only_model", False):
            self._save_checkpoint(state, resumable=True)  # whole even with --save_only_model: it is for resuming
        path = self.work_dir / f"checkpoint-{state.global_step}"
        if self.accelerator.is_main_process:
            print(f"training stopped by {signal.Signals(signum).name} after step {state.global_step}: {path} written; "
                  "resume with --resume_from_checkpoint true", file=sys.stderr, flush=True)
        raise TrainingInterrupted(signum, state.global_step, path)

    def _save_checkpoint(self, state: LoopState, resumable: bool = False) -> None:
        """Write ``checkpoint-N`` atomically (the model only with ``save_only_model``, unless ``resumable``). A
        failure to write it (a full disk, a quota, a lost mount) removes the partial folder and is a one-line
        :class:`UserError`; the earlier checkpoints are untouched.

        Raises:
            UserError: an ``OSError`` while writing the checkpoint.
        """
        import shutil

        try:
            save_checkpoint(self.accelerator, self.work_dir, state, keep=self.config.save_total_limit,
                            trainer_state=self.events.state_dict(),
                            model_only=getattr(self.config, "save_only_model", False) and not resumable,
                            each_node=getattr(self.config, "save_on_each_node", False))
        except OSError as exc:
            partial = self.work_dir / f".checkpoint-{state.global_step}.partial"
            if self.accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise UserError(f"could not write checkpoint-{state.global_step} in {self.work_dir}: {exc} "
                            "(the earlier checkpoints are intact)") from exc
        if self.accelerator.is_main_process:
            plot_metrics(self.metrics.rows(), self.work_dir / "plots", self.plot_panels)
        self.events.saved(self.work_dir / f"checkpoint-{state.global_step}")
