"""Checkpoints of the training loop: written atomically, found again, pruned, resumed from.

A checkpoint is ``output_dir/checkpoint-N/``: accelerate's state (model, optimizer, scheduler, random states)
plus ``trainer_state.json`` (step, epoch, position in the epoch). It is written into a hidden
``.checkpoint-N.partial`` folder and renamed into place only when complete, so a crash or a full disk while
saving leaves the previous checkpoints intact; only folders with ``trainer_state.json`` count as complete.

A complete checkpoint can still be damaged later (a disk error, a copy cut short): :func:`checkpoint_problem`
reads the headers of its files (cheaply: the safetensors header, the zip directory of ``torch.save`` files), and
resuming with ``true`` takes the newest checkpoint that passes (:func:`resolve_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignlab.errors import UserError
from alignlab.models import _first_line, weights_file_problem

logger = logging.getLogger(__name__)


class _TiedWeightsNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor ... while saving" warning: a model with tied input and output
    embeddings (SmolLM2, Qwen2.5, ...) stores the shared matrix once in safetensors and ties it again on loading,
    which every checkpoint of such a model would otherwise report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())

STATE_FILE = "trainer_state.json"
STAGING_DIR = ".alignlab-staging"
"""Where a run started with ``--overwrite_output_dir`` over an earlier run keeps its files (checkpoints included)
until it saves its model (:mod:`alignlab.train.output_dir`); ``--resume_from_checkpoint true`` looks here first."""


@dataclass
class LoopState:
    """Where the loop is: ``global_step`` optimizer steps done, in ``epoch`` (0-based), ``steps_in_epoch`` of it."""

    global_step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` directories in ``output_dir`` as ``(N, path)``, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and (path / STATE_FILE).exists():
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-N`` directory with the largest N in ``output_dir`` (complete ones only)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What keeps the checkpoint folder ``path`` from being resumed, or ``None`` when it looks whole.

    Checks that ``trainer_state.json`` is there and parses, and reads the header of every weights and state file
    (a safetensors header, a ``torch.save`` zip directory): a file cut short or overwritten fails there. The
    tensors themselves are not read (a flipped bit inside them is not found).
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["global_step"]), int(state["epoch"]), int(state["steps_in_epoch"])
    except FileNotFoundError:
        return f"it has no {STATE_FILE} (it was not completely written)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {STATE_FILE} is unreadable ({_first_line(exc)})"
    if state.get("save_only_model"):
        return "it holds the model only (written with --save_only_model: no optimizer or random states)"
    for file in sorted(path.rglob("*")):
        problem = weights_file_problem(file) if file.is_file() else None
        if problem:
            return problem
    return None


def _older_hint(path: Path) -> str:
    """`` ; the newest whole checkpoint before it is X: resume with --resume_from_checkpoint X`` (or that there
    is none)."""
    name = re.fullmatch(r"checkpoint-(\d+)", path.name)
    step = int(name.group(1)) if name else None
    for n, older in reversed(list_checkpoints(path.parent)):
        if older != path and (step is None or n < step) and checkpoint_problem(older) is None:
            return f"; the newest whole checkpoint before it is {older}: resume with --resume_from_checkpoint {older}"
    return f"; {path.parent} has no older whole checkpoint"


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``true`` for the newest whole one (the newest that
    :func:`checkpoint_problem` passes, a damaged newer one skipped with a warning) in ``output_dir``'s staging
    folder (:data:`STAGING_DIR`: a run over an earlier one, not yet saved) when that has any, else in
    ``output_dir``; or a path.

    Raises:
        UserError: ``true`` with no whole checkpoint, or a path that is not a whole checkpoint (the message names
            what is wrong and the newest older whole checkpoint to use instead).
    """
    if not spec:
        return None
    if str(spec).lower() == "true":
        output_dir = Path(output_dir)
        staged = list_checkpoints(output_dir / STAGING_DIR)
        found = staged or list_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint true: no checkpoint-N in {output_dir}")
        damaged = []
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                for bad in damaged:
                    logger.warning("%s", bad)
                return path
            damaged.append(f"{path} cannot be resumed: {problem}; using an older checkpoint")
        raise UserError(f"--resume_from_checkpoint true: no whole checkpoint in {found[-1][1].parent} "
                        f"({found[-1][1].name}: {checkpoint_problem(found[-1][1])})")
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint: {spec} is not a checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint: {spec} cannot be resumed: {problem}{_older_hint(path)}")
    return path


TRAINING_STATE_PREFIXES = ("optimizer", "scheduler", "random_states", "custom_checkpoint", "sampler",
                           "dl_state_dict")
"""accelerate's ``save_state`` files other than the model's, left out of a ``model_only`` checkpoint."""


def save_checkpoint(accelerator, output_dir: Path, state: LoopState, *, keep: int | None,
                    trainer_state: dict | None = None, model_only: bool = False, each_node: bool = False) -> Path:
    """Write ``checkpoint-{global_step}`` atomically (all processes call it), then keep the newest ``keep``.

    ``trainer_state``: transformers' ``TrainerState`` as a dict (``log_history``, a fractional ``epoch``, ...);
    ``trainer_state.json`` then holds it, the loop's own position added (``epoch_index``, ``steps_in_epoch``).
    ``model_only`` (``TrainingArguments.save_only_model``): the optimizer, scheduler and random states are left
    out (:data:`TRAINING_STATE_PREFIXES`), so the checkpoint is smaller and cannot be resumed
    (:func:`checkpoint_problem` says so). ``each_node`` (``save_on_each_node``): the main process of every
    machine writes the folder (machines without a shared file system), not only the run's main process;
    accelerate's own files follow ``ProjectConfiguration(save_on_each_node=True)``
    (:func:`~alignlab.train.trl_args.accelerator_options`).

    Returns:
        The checkpoint's path.
    """
    acc = accelerator
    writer = acc.is_local_main_process if each_node else acc.is_main_process
    final = output_dir / f"checkpoint-{state.global_step}"
    partial = output_dir / f".checkpoint-{state.global_step}.partial"
    acc.wait_for_everyone()
    if writer and partial.exists():
        shutil.rmtree(partial)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    acc.wait_for_everyone()
    if writer:
        if model_only:
            for file in list(partial.iterdir()):
                if file.name.startswith(TRAINING_STATE_PREFIXES):
                    shutil.rmtree(file) if file.is_dir() else file.unlink()
        data = {**(trainer_state or {}), "global_step": state.global_step, "epoch_index": state.epoch,
                "steps_in_epoch": state.steps_in_epoch, "num_processes": acc.num_processes}
        if model_only:
            data["save_only_model"] = True
        data.setdefault("epoch", state.epoch)
        (partial / STATE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # a crash before this line leaves the previous checkpoint intact
        if keep:
            for _, path in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> LoopState:
    """Restore accelerate's state from ``path``; returns where the loop was.

    Raises:
        UserError: ``path`` was written by another number of processes than this run has. Each process's data
            position and random state are saved apart (and under FSDP2 its shard), so the continuation would
            not be the uninterrupted run's. Or one of its files does not load (the message names the newest
            older whole checkpoint).
    """
    data = json.loads((path / STATE_FILE).read_text())
    written_by = data.get("num_processes")  # absent in checkpoints written before it was recorded
    if written_by is not None and written_by != accelerator.num_processes:
        raise UserError(f"--resume_from_checkpoint: {path} was written by {written_by} process(es) and this run "
                        f"has {accelerator.num_processes}; resume with {written_by} (e.g. torchrun "
                        f"--nproc_per_node {written_by})")
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # any file of it that does not load: SafetensorError, UnpicklingError, a shape, ...
        raise UserError(f"--resume_from_checkpoint: cannot load {path}: {_first_line(exc)}{_older_hint(path)}") from exc
    return LoopState(data["global_step"], int(data.get("epoch_index", data["epoch"])), data["steps_in_epoch"])
