"""Experiment trackers (TensorBoard, Weights & Biases, Trackio, ...) through accelerate, named by ``--report_to``.

``--report_to`` keeps the name and values of ``transformers.TrainingArguments.report_to`` (which TRL's configs
inherit): ``none`` (the default: nothing but ``metrics.jsonl``), ``all`` (every supported tracker whose package is
installed), or one or more tracker names. alignlab does not use the ``transformers`` integrations: the trackers
are accelerate's (``Accelerator(log_with=...)``, ``init_trackers``, ``log``), which run on the main process only.

Where things go (``output_dir`` is the run's folder):
    - tensorboard: event files in ``output_dir/runs/<project_name>/`` (``runs/`` as in ``TrainingArguments``'
      default ``logging_dir``); read them with ``tensorboard --logdir output_dir/runs``.
    - wandb: the run folder under ``output_dir/wandb/``; ``WANDB_MODE=offline`` keeps it there without network
      (upload later with ``wandb sync``).
    - trackio: its local database (``TRACKIO_DIR``), project ``<project_name>``.
    - the others: wherever their package writes by default.

Rows logged are those of ``metrics.jsonl`` (TRL's metric names), numbers only, at the row's ``step``.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignlab.errors import UserError

logger = logging.getLogger(__name__)

# accelerate's tracker names (accelerate.utils.LoggerType) -> (pip package, accelerate's availability check).
# The availability checks are the ones accelerate's `filter_trackers` applies: a tracker that fails its check
# is dropped by accelerate silently, so `resolve_report_to` refuses it up front instead.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "trackio": ("trackio", "is_trackio_available"),
    "comet_ml": ("comet-ml", "is_comet_ml_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
    "aim": ("'aim<4'", "is_aim_available"),
    "clearml": ("clearml", "is_clearml_available"),
    "dvclive": ("dvclive", "is_dvclive_available"),
    "swanlab": ("swanlab", "is_swanlab_available"),
}


def _installed(name: str) -> bool:
    import accelerate.utils

    return bool(getattr(accelerate.utils, TRACKERS[name][1])())


def resolve_report_to(value: list[str] | str | None) -> list[str]:
    """The tracker names that ``--report_to`` asks for, each checked to be known and installed.

    Args:
        value: ``None``, a string (one name, or several separated by commas or spaces) or a list of names.
            ``"none"`` means no tracker; ``"all"`` means every supported tracker whose package is installed
            (``TrainingArguments.report_to`` semantics).

    Returns:
        Tracker names in the order given, without repeats (``[]`` for ``none``).

    Raises:
        UserError: an unknown name, ``none``/``all`` mixed with other names, or a tracker whose package is not
            installed (the message says which ``pip install`` adds it).
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names = [part for item in items for part in str(item).replace(",", " ").split()]
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        found = [name for name in TRACKERS if _installed(name)]
        logger.info("--report_to all: %s", ", ".join(found) or "no tracker package is installed")
        return found
    if "none" in names or "all" in names:
        raise UserError(f"--report_to {' '.join(names)}: 'none' and 'all' cannot be combined with other names")
    resolved = []
    for name in names:
        if name not in TRACKERS:
            raise UserError(
                f"--report_to {name!r} is not a known tracker: choose from none, all, {', '.join(TRACKERS)}"
            )
        if not _installed(name):
            raise UserError(
                f"--report_to {name}: the {name} package is not installed (pip install {TRACKERS[name][0]})"
            )
        if name not in resolved:
            resolved.append(name)
    return resolved


def accelerator_tracking_kwargs(report_to: list[str], output_dir: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.Accelerator`` that route ``report_to`` trackers into ``output_dir``.

    Args:
        report_to: from :func:`resolve_report_to`.
        output_dir: the run's folder; trackers that write locally write under ``output_dir/runs``.

    Returns:
        ``{"log_with": report_to or None, "project_config": ProjectConfiguration(project_dir=output_dir,
        logging_dir=output_dir/runs)}``.
    """
    from accelerate.utils import ProjectConfiguration

    out = Path(output_dir)
    return {
        "log_with": list(report_to) or None,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")),
    }


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``config`` as one level of ``bool``/``int``/``float``/``str`` values, what every tracker accepts.

    Nested mappings become ``parent/child`` keys; ``None`` values are left out (TensorBoard's hparams skip
    them); anything else (lists, paths, enums) becomes its ``str``.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}/"))
        elif value is None:
            continue
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def numeric_row(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` row as floats, without ``step`` (the step is passed on its own).

    Strings, ``None``, lists and other non-numbers are left out; ``NaN`` and infinities stay (they are the
    metric's value). ``bool`` counts as a number (0/1).
    """
    out = {}
    for key, value in row.items():
        if key == "step":
            continue
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d torch tensor or numpy scalar
            value = value.item()
        if isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


class Tracking:
    """The run's experiment trackers: start, log ``metrics.jsonl`` rows, finish. A no-op with no tracker.

    Args:
        accelerator: an ``accelerate.Accelerator`` made with :func:`accelerator_tracking_kwargs` (or
            ``log_with=...`` and ``project_dir=output_dir``).
        project_name: the tracker project (wandb/trackio project; TensorBoard's sub-folder of ``runs/``).
        config: the run's settings, nested or flat; stored as hyperparameters (flattened by
            :func:`flatten_config`).
        run_name: the run's display name in wandb and trackio (default: the tracker's own).
    """

    def __init__(
        self,
        accelerator,
        *,
        project_name: str = "alignlab",
        config: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ):
        self.accelerator = accelerator
        self.enabled = bool(accelerator.log_with)
        self._finished = False
        if not self.enabled:
            return
        init_kwargs: dict[str, dict] = {}
        names = {str(tracker) for tracker in accelerator.log_with}
        if "wandb" in names:
            wandb_dir = Path(accelerator.project_dir or ".")
            wandb_dir.mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"] = {"dir": str(wandb_dir), **({"name": run_name} if run_name else {})}
        if "trackio" in names and run_name:
            init_kwargs["trackio"] = {"name": run_name}
        accelerator.init_trackers(project_name, config=flatten_config(config or {}), init_kwargs=init_kwargs)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Send one ``metrics.jsonl`` row (its numbers, see :func:`numeric_row`) at optimizer step ``step``."""
        if not self.enabled:
            return
        values = numeric_row(row)
        if values:
            self.accelerator.log(values, step=int(step))

    def end_training(self) -> None:
        """Finish every tracker (flushes and closes files, ends the wandb run). Safe to call twice.

        Unlike ``Accelerator.end_training`` this leaves the distributed process group alone, so a process that
        trains several models in a row (``compare``) can go on.
        """
        if not self.enabled or self._finished:
            return
        self._finished = True
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
