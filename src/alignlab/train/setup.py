"""What every algorithm does before the loop starts: read its train and eval data, and ready its model."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch

from alignlab.data.io import read_rows
from alignlab.errors import UserError
from alignlab.models import apply_lora
from alignlab.train.config import TrainConfig
from alignlab.train.loop import disable_dropout

logger = logging.getLogger(__name__)


def split_rows(rows: list, eval_split_size: float, seed: int) -> tuple[list, list]:
    """Random train/eval split of ``rows``: ``eval_split_size`` is a fraction in (0, 1) or a row count.

    Raises:
        UserError: if the split would leave no training rows.
    """
    if not eval_split_size:
        return rows, []
    n_eval = round(eval_split_size * len(rows)) if eval_split_size < 1 else int(eval_split_size)
    n_eval = max(1, n_eval)
    if n_eval >= len(rows):
        raise UserError(f"--eval_split_size {eval_split_size} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def load_train_eval(
    config: TrainConfig, build: Callable, tokenizer, *, is_main_process: bool = True, **build_kwargs
) -> tuple[list, list]:
    """Read ``config.dataset_name`` and the eval data (``eval_dataset_name``, or an ``eval_split_size``
    hold-out), turn both into examples with ``build(rows, tokenizer, **build_kwargs) -> (examples, stats)``,
    and log what happened to the rows (``stats.describe()``) on the main process.

    Returns:
        ``(train_examples, eval_examples)``; the second is empty when no eval data is asked for.

    Raises:
        UserError / DataError: from reading and building (a bad row is named by file and line or row).
    """
    rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_train_split)
    if config.eval_dataset_name:
        eval_rows = read_rows(config.eval_dataset_name, config_name=config.dataset_config, split=config.dataset_test_split)
    else:
        rows, eval_rows = split_rows(rows, config.eval_split_size, config.seed)
    train, stats = build(rows, tokenizer, **build_kwargs)
    if is_main_process:
        logger.info("train data %s: %s", config.dataset_name, stats.describe())
    evals = []
    if eval_rows:
        evals, eval_stats = build(eval_rows, tokenizer, **build_kwargs)
        if is_main_process:
            logger.info("eval data: %s", eval_stats.describe())
    return train, evals


def frozen_model(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``model`` as a frozen model (a reference or reward model): on ``accelerator.device``, in eval mode, without
    gradients, and sharded with FSDP2 when the trained model is (:func:`alignlab.train.distributed.shard_frozen`).
    Returns the same module."""
    from alignlab.train.distributed import shard_frozen

    model = model.to(accelerator.device).eval().requires_grad_(False)
    return shard_frozen(accelerator, model)


def prepare_model(
    model: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    *,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
) -> torch.nn.Module:
    """Ready a freshly loaded model for training as ``config`` asks: no KV cache, dropout off when
    ``disable_dropout``, LoRA adapters when ``use_peft`` (peft ``task_type``, ``modules_to_save``), gradient
    checkpointing when asked, then moved to ``device``. Returns the (possibly peft-wrapped) model."""
    model.config.use_cache = False
    if config.disable_dropout:
        disable_dropout(model)
    if config.use_peft:
        model = apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type=task_type,
            modules_to_save=modules_to_save,
        )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)
