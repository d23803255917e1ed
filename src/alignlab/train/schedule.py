"""The training loop's optimizer, learning-rate schedule and cadence (when to log, evaluate and save), from
transformers' ``TrainingArguments`` fields with their meaning there: ``optim`` / ``optim_args`` through
transformers' own optimizer selection, every ``lr_scheduler_type`` through ``transformers.get_scheduler`` with
``lr_scheduler_kwargs``, ``*_strategy`` ("no", "steps", "epoch"), and float ``*_steps`` below 1 as ratios of the
total steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.errors import UserError


def resolve_steps(value: float | None, total_steps: int) -> int | None:
    """A ``*_steps`` value as ``TrainingArguments`` reads it: a float in (0, 1) is a ratio of ``total_steps``
    (``ceil(total_steps * value)``, at least 1), anything else a count (``None`` stays ``None``)."""
    if value is None:
        return None
    if 0 < value < 1:
        return max(1, math.ceil(total_steps * value))
    return int(value)


def check_steps(name: str, value: float | None) -> None:
    """A ``*_steps`` flag is a ratio in (0, 1) or a whole count (``TrainingArguments``' rule).

    Raises:
        UserError: a value above 1 that is not whole.
    """
    if value is not None and value > 1 and value != int(value):
        raise UserError(f"--{name} must be a whole number of steps or a ratio in (0, 1), got {value}")


def build_optimizer(config: Any, model: torch.nn.Module, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer ``config.optim`` names (``adamw_torch``, ``adamw_torch_fused``, ``adafactor``, ``sgd``,
    ``adagrad``, ``rmsprop``, ``lion_*``, ... every name of transformers' ``OptimizerNames``), built by
    ``transformers.Trainer.get_optimizer_cls_and_kwargs`` from ``learning_rate``, ``adam_beta1/2``,
    ``adam_epsilon``, ``optim_args`` and ``optim_target_modules``, over the parameter ``groups`` (weight decay per
    group). ``adamw_torch_fused`` falls back to ``adamw_torch`` where torch's fused kernel does not run.

    Raises:
        UserError: an unknown optimizer name, or one whose package is missing (one line).
    """
    from transformers import Trainer

    params = [p for g in groups for p in g["params"]]
    if config.optim == "adamw_torch_fused" and not all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        config.optim = "adamw_torch"
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(config, model)
    except (ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--optim {config.optim}: {first}") from exc
    for key in ("params", "model", "optimizer_dict"):  # GaLore, LOMO and layer-wise optimizers (as Trainer)
        if key in kwargs:
            groups = kwargs.pop(key)
    return cls(groups, **kwargs)


def build_scheduler(config: Any, optimizer: torch.optim.Optimizer, total_steps: int):
    """``transformers.get_scheduler(lr_scheduler_type, ...)`` with ``lr_scheduler_kwargs`` (e.g. ``min_lr_rate``
    for ``cosine_with_min_lr``); warm-up from ``warmup_steps`` (a ratio of ``total_steps`` when below 1) or,
    when that is 0, ``warmup_ratio``.

    Raises:
        UserError: an unknown scheduler name, or keyword arguments it does not take (one line).
    """
    from transformers import SchedulerType, get_scheduler

    try:
        name = SchedulerType(config.lr_scheduler_type)
    except ValueError as exc:
        choices = ", ".join(s.value for s in SchedulerType)
        raise UserError(f"--lr_scheduler_type: unknown scheduler {config.lr_scheduler_type!r}; choose from "
                        f"{choices}") from exc
    warmup = resolve_steps(config.warmup_steps, total_steps) or math.ceil(config.warmup_ratio * total_steps)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=dict(config.lr_scheduler_kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"--lr_scheduler_type {name.value} with --lr_scheduler_kwargs "
                        f"{config.lr_scheduler_kwargs}: {exc}") from exc


@dataclass
class Cadence:
    """When the loop logs, evaluates and saves, as transformers' ``DefaultFlowCallback`` decides it:
    ``*_strategy`` "steps" every ``*_steps`` optimizer steps, "epoch" at the end of every epoch, "no" never;
    ``logging_first_step`` also logs step 1; evaluation waits for ``eval_delay`` (steps or epochs). alignlab
    also logs the last step, and an evaluation set given with ``eval_strategy`` "no" but ``eval_steps`` set is
    evaluated every ``eval_steps`` (its own earlier behaviour); the final evaluation and model save are the
    loop's. Build it with :meth:`from_config`."""

    logging_strategy: str
    logging_steps: int
    logging_first_step: bool
    eval_strategy: str
    eval_steps: int | None
    eval_delay: float
    save_strategy: str
    save_steps: int
    empty_cache_steps: int | None = None

    @classmethod
    def from_config(cls, config: Any, total_steps: int) -> "Cadence":
        eval_strategy = config.eval_strategy
        eval_steps = resolve_steps(config.eval_steps, total_steps)
        logging_steps = resolve_steps(config.logging_steps, total_steps) or 1
        if eval_strategy == "no" and eval_steps:
            eval_strategy = "steps"
        if eval_strategy == "steps" and not eval_steps:
            eval_steps = logging_steps  # TrainingArguments' fallback
        return cls(config.logging_strategy, logging_steps, config.logging_first_step, eval_strategy, eval_steps,
                   config.eval_delay, config.save_strategy, resolve_steps(config.save_steps, total_steps) or 0,
                   config.torch_empty_cache_steps)

    def after_step(self, step: int) -> None:
        """Empty the accelerator's memory cache every ``torch_empty_cache_steps`` steps (accelerate's
        ``clear_device_cache``; nothing to do on a CPU)."""
        if self.empty_cache_steps and step % self.empty_cache_steps == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()

    def log(self, step: int, epoch_end: bool, is_last: bool) -> bool:
        """Whether to write a ``metrics.jsonl`` row after ``step``."""
        if self.logging_strategy == "no":
            return False
        return (is_last or (step == 1 and self.logging_first_step)
                or (self.logging_strategy == "steps" and step % self.logging_steps == 0)
                or (self.logging_strategy == "epoch" and epoch_end))

    def evaluate(self, step: int, epoch: float, epoch_end: bool) -> bool:
        """Whether to evaluate after ``step`` (``epoch``: epochs done so far)."""
        if self.eval_strategy == "steps":
            return step % self.eval_steps == 0 and self.eval_delay <= step
        return self.eval_strategy == "epoch" and epoch_end and self.eval_delay <= epoch

    def save(self, step: int, epoch_end: bool) -> bool:
        """Whether to write ``checkpoint-N`` after ``step``."""
        if self.save_strategy == "steps":
            return self.save_steps > 0 and step % self.save_steps == 0
        return self.save_strategy == "epoch" and epoch_end


def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv 2404.09656; TRL's ``SyncRefModelCallback``):
    every reference parameter becomes ``alpha * policy + (1 - alpha) * reference``, in place.

    Raises:
        UserError: the two models' parameters do not match one to one (names and shapes).
    """
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in policy.named_parameters():
            target = ref_params.get(name)
            if target is None or target.shape != param.shape:
                raise UserError(f"--sync_ref_model: the reference model has no parameter {name} of shape "
                                f"{tuple(param.shape)}")
            target.mul_(1.0 - alpha).add_(param.to(target.dtype), alpha=alpha)


def loader_options(config: Any, *, shuffle: bool, online: bool, device: torch.device) -> dict[str, Any]:
    """``torch.utils.data.DataLoader`` keyword arguments from the config's ``dataloader_*`` fields,
    ``train_sampling_strategy`` (random or sequential), ``shuffle_dataset`` (GRPO's and RLOO's prompt order; SFT's
    field of that name is a shuffle before packing, :mod:`alignlab.algorithms.sft`), and the data
    order's seed ``data_seed`` (unset: ``seed``). ``shuffle``: the loader is the training one; ``online``: it
    yields prompt batches, dropping a last incomplete one."""
    workers = config.dataloader_num_workers
    options: dict[str, Any] = {
        "shuffle": shuffle and config.train_sampling_strategy != "sequential"
        and (not online or getattr(config, "shuffle_dataset", True)),
        "num_workers": workers,
        "generator": torch.Generator().manual_seed(config.seed if config.data_seed is None else config.data_seed),
        "drop_last": online or config.dataloader_drop_last,
        "pin_memory": config.dataloader_pin_memory and device.type != "cpu",
    }
    if workers:
        options.update(persistent_workers=config.dataloader_persistent_workers,
                       prefetch_factor=config.dataloader_prefetch_factor,
                       multiprocessing_context=config.dataloader_multiprocessing_context,
                       in_order=config.dataloader_in_order)
    return options
