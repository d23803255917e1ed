"""A training run's ``output_dir``: what a run may write there, when, and what a failure leaves.

The rules (docs/faults.md, "The output folder"):

* A folder that holds an earlier run (a trained model, checkpoints, ``metrics.jsonl`` / ``config.yaml`` /
  ``samples.jsonl`` / ``plots/``) is refused with one line, unless the run resumes from one of its checkpoints
  (``--resume_from_checkpoint``) or ``--overwrite_output_dir`` is given.
* A new run in a fresh folder (missing, empty, or holding none of those) writes straight into it, so
  ``metrics.jsonl`` can be followed while it trains.
* A new run over an earlier one (``--overwrite_output_dir``) writes everything of its own, checkpoints included,
  into the hidden staging folder :data:`~alignlab.train.checkpoint.STAGING_DIR` inside ``output_dir``; the
  earlier run's files are untouched until the new run has saved its model there, and are then replaced
  (:meth:`OutputFolder.publish`). ``--resume_from_checkpoint true`` finds an unfinished staged run's
  checkpoints there.
* A resumed run goes on in the folder of the checkpoint it resumed (``metrics.jsonl`` is cut back to that step).
* A run that fails (any error but SIGTERM / SIGINT, whose checkpoint is the point) writes :data:`FAILURE_LOG`
  and removes what it wrote, unless it wrote a checkpoint (which can be resumed, and then stays with its
  ``metrics.jsonl``). The earlier run's files are never touched by a failed run.

Only the main process reads the folder and decides; the decision is broadcast to every process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path

from alignlab.errors import UserError
from alignlab.train.checkpoint import STAGING_DIR, list_checkpoints, resolve_resume
from alignlab.train.lock import OutputDirLock

logger = logging.getLogger(__name__)

FAILURE_LOG = "failed-run.log"
"""What a failed run leaves in ``output_dir``: its error, its command line, what it kept, its traceback when the
error was not a bad input, and the ``metrics.jsonl`` rows it had written."""

REPLACED_DIR = ".alignlab-replaced"
"""Where the earlier run's files wait while a staged run's files move into place (:meth:`OutputFolder.publish`);
removed at the end. Found at the start of a run, it means a move was cut short, and the move is finished."""

_MOVED_MARK = ".moved"

RUN_FILES = ("metrics.jsonl", "config.yaml", "samples.jsonl", "plots")
"""Files a run writes while it trains (checkpoints aside)."""

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
               "pytorch_model.bin", "pytorch_model.bin.index.json")
"""Any of these (with ``config.json`` or ``adapter_config.json``) makes a folder hold a trained model."""

_OUTPUT_PATTERNS = (
    *RUN_FILES, "README.md", "config.json", "generation_config.json", "chat_template.jinja", "adapter_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "model*.safetensors*",
    "adapter_model*", "pytorch_model*", "tokenizer*", "checkpoint-*", ".checkpoint-*.partial", ".model.partial",
    "trainer_state.json", FAILURE_LOG,
)
"""Names in ``output_dir`` that a run writes; what an earlier run left under them is replaced when a staged
run saves. Anything else (a tracker's ``runs/`` or ``wandb/``, the user's own files) stays."""


def _is_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _OUTPUT_PATTERNS)


def check_writable(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """``path`` as a folder a run can create and write in, checked before any work.

    Raises:
        UserError: ``path`` (or a folder above it) is a file, or the nearest existing folder cannot be written.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} cannot be written (permission denied)")
    return path


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a file that can be written (its folder created if need be), checked before any work.

    Raises:
        UserError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file")
    check_writable(path.parent, flag=f"{flag} {path}: the folder")
    return path


def earlier_run(output_dir: str | os.PathLike) -> str | None:
    """What an earlier run left in ``output_dir`` (``"a trained model (model.safetensors)"``, ``"checkpoints
    (checkpoint-4, ...)"``, ...), or ``None`` when a new run can start there without replacing anything."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    weights = [name for name in MODEL_FILES if (out / name).is_file()]
    if weights and ((out / "config.json").is_file() or (out / "adapter_config.json").is_file()):
        return f"a trained model ({weights[0]})"
    staged = list_checkpoints(out / STAGING_DIR)
    if staged:
        return (f"an unfinished run started with --overwrite_output_dir (its newest checkpoint: "
                f"{staged[-1][1]})")
    found = list_checkpoints(out)
    if found:
        return f"the checkpoints of an unfinished run (newest: {found[-1][1].name})"
    files = [name for name in RUN_FILES if (out / name).exists()]
    if files:
        return f"an earlier run's {', '.join(files)}"
    return None


def refusal(output_dir: str | os.PathLike, overwrite: bool, resume: str | None) -> str | None:
    """The one-line reason a new run may not start in ``output_dir`` (``None``: it may)."""
    if overwrite or resume:
        return None
    left = earlier_run(output_dir)
    if left is None:
        return None
    resumable = "trained model" not in left
    hint = "resume it with --resume_from_checkpoint true, " if resumable else ""
    return (f"--output_dir {output_dir} holds {left}: {hint}pass --overwrite_output_dir to replace it (its files "
            "are replaced only when the new run saves its model), or choose another --output_dir")


def _whose(checkpoint: Path | None, output_dir: Path) -> str | None:
    """``"staged"`` for a checkpoint in ``output_dir``'s staging folder, ``"own"`` for one in ``output_dir``, else
    ``None`` (no checkpoint, or another folder's: the run is a new run in ``output_dir``)."""
    if checkpoint is None:
        return None
    parent = checkpoint.resolve().parent
    if parent == (output_dir / STAGING_DIR).resolve():
        return "staged"
    return "own" if parent == output_dir.resolve() else None


def preflight(config, *, resume: bool = True) -> None:
    """The checks of a training command's ``output_dir`` made before any model is loaded (the command line calls
    it): the folder can be written, a new run does not start over an earlier one without
    ``--overwrite_output_dir``, and ``--resume_from_checkpoint`` names a checkpoint that can be resumed. The run
    itself checks again under its lock (:class:`OutputFolder`). ``resume=False``: the command's checkpoints
    are its inner runs' (iterative-dpo's rounds), which resolve ``--resume_from_checkpoint`` themselves.

    Raises:
        UserError: the folder is a file or cannot be written; it holds an earlier run; a bad checkpoint.
    """
    out = check_writable(config.output_dir)
    found = resolve_resume(config.resume_from_checkpoint, out) if resume else None
    resuming_inner_runs = not resume and bool(config.resume_from_checkpoint)
    reason = None if _whose(found, out) or resuming_inner_runs else refusal(out, config.overwrite_output_dir, None)
    if reason:
        raise UserError(reason)


def _share(accelerator, value):
    """``value`` of the main process, on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing what is there (a folder too)."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)


class OutputFolder:
    """The output folder of one run, held for its length (a context manager around the training).

    On entry the main process checks that the folder can be written, takes its lock
    (:class:`~alignlab.train.lock.OutputDirLock`), finishes a move a crash cut short, and decides where the run
    writes (:attr:`work_dir`: ``output_dir`` itself, or the staging folder) and what it resumes from
    (:attr:`resume`); every process gets the decision. On an exit by an error, the main process writes
    :data:`FAILURE_LOG` and removes what the run wrote (unless it wrote a checkpoint). The lock is released last.

    Args:
        config: the run's :class:`~alignlab.train.config.TrainConfig` (``output_dir``, ``overwrite_output_dir``,
            ``resume_from_checkpoint``).
        accelerator: the run's accelerator (``None``: one process).

    Raises (on entry):
        UserError: the folder is a file or cannot be written; another live run holds it; it holds an earlier run
            and neither ``--overwrite_output_dir`` nor ``--resume_from_checkpoint`` is given; a checkpoint that
            cannot be resumed.
    """

    def __init__(self, config, accelerator=None):
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)
        self.is_main = accelerator is None or accelerator.is_main_process
        self.work_dir = self.output_dir
        self.staged = False
        self.resume: Path | None = None
        self._fresh = False  # a new run: what it wrote goes when it fails without a checkpoint
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        decision: tuple | str
        if self.is_main:
            try:
                check_writable(self.output_dir)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._stack.enter_context(OutputDirLock(self.output_dir))
                self._finish_interrupted_move()
                decision = self._decide()
            except UserError as exc:
                self._stack.close()
                decision = str(exc)
            except OSError as exc:
                self._stack.close()
                decision = f"--output_dir {self.output_dir}: cannot be written ({exc.strerror or exc})"
        else:
            decision = ("", False, None, False)
        decision = _share(self.accelerator, decision)
        if isinstance(decision, str):
            raise UserError(decision)
        work_dir, self.staged, resume, self._fresh = decision
        self.work_dir = Path(work_dir)
        self.resume = Path(resume) if resume else None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            # SIGTERM / SIGINT after a checkpoint of the last step (the loop's TrainingInterrupted, which names its
            # checkpoint) is a clean stop; an error, or a stop in the middle of a step, is not
            stopped_cleanly = getattr(exc, "checkpoint", None) is not None
            failed = exc_type is not None and not stopped_cleanly and issubclass(
                exc_type, (Exception, SystemExit, KeyboardInterrupt))
            if failed and self.is_main:
                try:
                    self._record_failure(exc)
                except OSError as error:  # a full disk: the run's own error is the one to show
                    logger.warning("could not write %s: %s", self.output_dir / FAILURE_LOG, error)
        finally:
            self._stack.close()

    def _decide(self) -> tuple[str, bool, str | None, bool]:
        """``(work_dir, staged, resume checkpoint, fresh)`` for this run (main process, lock held)."""
        cfg, out = self.config, self.output_dir
        staging = out / STAGING_DIR
        resume = resolve_resume(cfg.resume_from_checkpoint, out)
        whose = _whose(resume, out)
        if whose:
            return str(staging if whose == "staged" else out), whose == "staged", str(resume), False
        # a new run (or one that starts from another folder's checkpoint)
        reason = refusal(out, cfg.overwrite_output_dir, None)
        if reason:
            raise UserError(reason)
        if staging.exists():  # a staged run that wrote no checkpoint: nothing to keep
            shutil.rmtree(staging)
        if earlier_run(out) is None:
            return str(out), False, str(resume) if resume else None, True
        staging.mkdir()
        logger.info("output_dir %s holds %s: it stays until this run saves its model (--overwrite_output_dir)",
                    out, earlier_run(out))
        return str(staging), True, str(resume) if resume else None, True

    # ------------------------------------------------------------------------------------------------------
    def final_path(self, path: str | os.PathLike) -> Path:
        """Where ``path`` (under :attr:`work_dir`) is once the run has saved."""
        path = Path(path)
        try:
            return self.output_dir / path.relative_to(self.work_dir)
        except ValueError:
            return path

    def publish(self) -> None:
        """The run has saved its model into :attr:`work_dir`: a staged run's files replace the earlier run's
        (main process; the earlier run's files that a run writes go, anything else stays), and a failure log
        left by an earlier attempt goes."""
        if not self.is_main:
            return
        if self.staged:
            replaced = self.output_dir / REPLACED_DIR
            if replaced.exists():
                shutil.rmtree(replaced)
            replaced.mkdir()
            for item in self.output_dir.iterdir():
                if _is_output(item.name):
                    os.replace(item, replaced / item.name)
            (replaced / _MOVED_MARK).touch()  # from here on a cut-short move is finished, not undone
            self._move_in(self.work_dir)
            shutil.rmtree(replaced)
            self.staged, self.work_dir = False, self.output_dir
        else:
            (self.output_dir / FAILURE_LOG).unlink(missing_ok=True)

    def _move_in(self, staging: Path) -> None:
        for item in staging.iterdir():
            _replace(item, self.output_dir / item.name)
        staging.rmdir()

    def _finish_interrupted_move(self) -> None:
        """A :meth:`publish` that a crash cut short: finish it (the staged run had saved completely)."""
        replaced = self.output_dir / REPLACED_DIR
        if not replaced.exists():
            return
        staging = self.output_dir / STAGING_DIR
        if staging.exists():
            if not (replaced / _MOVED_MARK).exists():
                for item in self.output_dir.iterdir():
                    if _is_output(item.name):
                        os.replace(item, replaced / item.name)
            logger.warning("output_dir %s: finishing the replacement of the earlier run that was cut short",
                           self.output_dir)
            self._move_in(staging)
        shutil.rmtree(replaced)

    # ------------------------------------------------------------------------------------------------------
    def _record_failure(self, exc: BaseException) -> None:
        """Write :data:`FAILURE_LOG` and take back what the run wrote, unless it wrote a checkpoint."""
        from alignlab.train.metrics import MetricsLog

        if isinstance(exc, KeyboardInterrupt):
            heading = "stopped: by SIGINT in the middle of a step"
        elif isinstance(exc, SystemExit):
            heading = f"stopped: by a signal in the middle of a step (exit status {exc.code})"
        else:
            heading = f"error: {' '.join(str(exc).split()) or type(exc).__name__}"
        checkpoints = list_checkpoints(self.work_dir)
        argv = ["alignlab", *sys.argv[1:]] if "alignlab" in sys.argv[0] else sys.argv
        lines = [heading, f"command: {shlex.join(argv)}"]
        rows: list[dict] = []
        with contextlib.suppress(OSError, ValueError):
            rows = MetricsLog(self.work_dir / "metrics.jsonl").rows()
        if checkpoints and (self._fresh or self.resume is not None):
            where = checkpoints[-1][1]
            lines.append(f"kept: the run's checkpoints and metrics.jsonl; resume from {where} with "
                         "--resume_from_checkpoint true")
        elif self._fresh:
            self._take_back()
            what = "the earlier run's files are as they were" if self.staged else "nothing of the run is kept"
            lines.append(f"kept: {what} (the run wrote no checkpoint)" + (
                "; its metrics.jsonl rows are below" if rows else ""))
        if isinstance(exc, Exception) and not isinstance(exc, UserError):
            lines += ["", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()]
        if rows and not checkpoints:
            lines += ["", "metrics.jsonl:"] + [json.dumps(row) for row in rows]
        path = self.output_dir / FAILURE_LOG
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _take_back(self) -> None:
        """Remove what a new run that failed without a checkpoint wrote."""
        if self.staged:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        for name in (*RUN_FILES, ".model.partial"):
            item = self.work_dir / name
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        for partial in self.work_dir.glob(".checkpoint-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)


__all__ = ["FAILURE_LOG", "OutputFolder", "check_writable", "check_writable_file", "earlier_run",
           "preflight", "refusal"]
