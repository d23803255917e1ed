"""What every offline algorithm does before the loop starts: read its train and eval data (readying its models
is the runtime's, :mod:`alignlab.train.runtime`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable


from alignlab.data.io import read_rows
from alignlab.errors import UserError
from alignlab.train.config import TrainConfig

logger = logging.getLogger(__name__)

EVAL_SET = "eval_set"
"""Key of an eval example naming its set, when there are several (their metrics are ``eval_{name}_*``)."""


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


def test_split_source(config: TrainConfig) -> tuple:
    """Where TRL's scripts take the evaluation set when ``eval_strategy`` is not "no" and no other eval data is
    given: the ``dataset_test_split`` split of ``dataset_name`` (a hub data set or a saved ``DatasetDict``).
    Returns ``read_rows``' arguments.

    Raises:
        UserError: ``dataset_name`` is a single file or a built-in set, which has no such split.
    """
    from pathlib import Path

    spec = config.dataset_name
    if not isinstance(spec, str) or spec.startswith("builtin:") or Path(spec).is_file():
        raise UserError(f"--eval_strategy {config.eval_strategy}: {spec} has no {config.dataset_test_split!r} split; "
                        "give --eval_dataset_name or --eval_split_size")
    return spec, {"config_name": config.dataset_config, "split": config.dataset_test_split}


def load_train_eval(
    config: TrainConfig, build: Callable, tokenizer, *, is_main_process: bool = True, **build_kwargs
) -> tuple[list, list]:
    """Read ``config.dataset_name`` and the eval data (``eval_dataset_name``, or an ``eval_split_size``
    hold-out), turn both into examples with ``build(rows, tokenizer, **build_kwargs) -> (examples, stats)``,
    and log what happened to the rows (``stats.describe()``) on the main process.

    Several eval sets (``eval_dataset`` given to a trainer as a dict, :func:`~alignlab.train.inputs.given_eval_sets`)
    are built one by one and each of their examples carries its set's name under :data:`EVAL_SET`, which the
    loop's evaluation groups by.

    Returns:
        ``(train_examples, eval_examples)``; the second is empty when no eval data is asked for.

    Raises:
        UserError / DataError: from reading and building (a bad row is named by file and line or row).
    """
    from alignlab.train.inputs import given_eval_sets

    rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_train_split)
    eval_sets = given_eval_sets()
    if eval_sets:  # (set name, rows); the name None: one set, its metrics eval_*
        eval_parts = [(name, read_rows(spec, config_name=config.dataset_config, split=config.dataset_test_split))
                      for name, spec in eval_sets.items()]
    elif config.eval_dataset_name:
        eval_parts = [(None, read_rows(config.eval_dataset_name, config_name=config.dataset_config,
                                       split=config.dataset_test_split))]
    elif getattr(config, "eval_strategy", "no") != "no" and not config.eval_split_size:
        spec, options = test_split_source(config)
        eval_parts = [(None, read_rows(spec, **options))]
    else:
        rows, eval_rows = split_rows(rows, config.eval_split_size, config.seed)
        eval_parts = [(None, eval_rows)] if eval_rows else []
    train, stats = build(rows, tokenizer, **build_kwargs)
    if is_main_process:
        logger.info("train data %s: %s", config.dataset_name, stats.describe())
    evals = []
    for name, eval_rows in eval_parts:
        examples, eval_stats = build(eval_rows, tokenizer, **build_kwargs)
        if name is not None:
            for example in examples:
                example[EVAL_SET] = name
        evals += examples
        if is_main_process:
            logger.info("eval data%s: %s", "" if name is None else f" {name}", eval_stats.describe())
    return train, evals
