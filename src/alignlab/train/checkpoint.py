"""Checkpoints of the training loop: written atomically, found again, pruned, resumed from.

A checkpoint is ``output_dir/checkpoint-N/``: accelerate's state (model, optimizer, scheduler, random states)
plus ``trainer_state.json`` (step, epoch, position in the epoch). It is written into a hidden
``.checkpoint-N.partial`` folder and renamed into place only when complete, so a crash or a full disk while
saving leaves the previous checkpoints intact; only folders with ``trainer_state.json`` count as complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignlab.errors import UserError

STATE_FILE = "trainer_state.json"


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


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``true`` for the newest in ``output_dir``, or a path.

    Raises:
        UserError: ``true`` with no checkpoint, or a path that is not a complete checkpoint.
    """
    if not spec:
        return None
    if str(spec).lower() == "true":
        path = find_latest_checkpoint(output_dir)
        if path is None:
            raise UserError(f"--resume_from_checkpoint true: no checkpoint-N in {output_dir}")
        return path
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise UserError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint directory")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: LoopState, *, keep: int | None) -> Path:
    """Write ``checkpoint-{global_step}`` atomically (all processes call it), then keep the newest ``keep``.

    Returns:
        The checkpoint's path.
    """
    acc = accelerator
    final = output_dir / f"checkpoint-{state.global_step}"
    partial = output_dir / f".checkpoint-{state.global_step}.partial"
    acc.wait_for_everyone()
    if acc.is_main_process and partial.exists():
        shutil.rmtree(partial)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"global_step": state.global_step, "epoch": state.epoch,
                                                      "steps_in_epoch": state.steps_in_epoch,
                                                      "num_processes": acc.num_processes}))
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
            not be the uninterrupted run's.
    """
    data = json.loads((path / STATE_FILE).read_text())
    written_by = data.get("num_processes")  # absent in checkpoints written before it was recorded
    if written_by is not None and written_by != accelerator.num_processes:
        raise UserError(f"--resume_from_checkpoint: {path} was written by {written_by} process(es) and this run "
                        f"has {accelerator.num_processes}; resume with {written_by} (e.g. torchrun "
                        f"--nproc_per_node {written_by})")
    accelerator.load_state(str(path))
    return LoopState(data["global_step"], data["epoch"], data["steps_in_epoch"])
