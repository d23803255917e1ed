"""The one training loop every algorithm shares.

It owns precision (bf16 autocast), gradient accumulation, the optimizer and schedule, gradient
clipping, logging to ``metrics.jsonl``, evaluation, plots, checkpoints (atomic) and resuming, and
distribution (accelerate: ``torchrun --nproc_per_node N`` runs DDP; gloo on CPU). An algorithm supplies a
``loss_fn(model, batch) -> (loss, metrics)`` and its data; nothing else.

Two shapes of step:

* offline (SFT, reward, DPO): each data-loader batch is a micro-batch; ``gradient_accumulation_steps`` of them
  make one optimizer step, and one optimizer step is one ``global_step``;
* online (PPO, GRPO, Online DPO): each data-loader batch is a batch of prompts handed to the algorithm's
  ``rollout_fn``, which samples, scores and returns a :class:`Rollout`: a list of optimizer updates, each a
  list of micro-batches for ``loss_fn``. One rollout and all its updates are one ``global_step`` (TRL PPO's
  "update"); the learning-rate schedule advances once per ``global_step``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from alignlab.errors import UserError
from alignlab.models import save_pretrained
from alignlab.ops.linear import onednn_float32_linear
from alignlab.train.config import TrainConfig
from alignlab.train.memory import configure_host_memory, release_free_memory
from alignlab.train.metrics import MetricsLog, plot_metrics

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(model, batch) -> (scalar loss, {name: (B,) or scalar detached metric})``.

A loss function may instead return an iterator of such pairs (a generator): the loop
back-propagates each loss before asking for the next, so a term's forward can run after the previous term's
activations are freed (PPO: the policy, then the value model). The micro-batch's logged ``loss`` is the sum
of the terms, its metrics their union; the gradient is that of the sum."""

STATE_FILE = "trainer_state.json"


@dataclass
class Rollout:
    """What an online algorithm's ``rollout_fn(model, prompts, step)`` returns for one ``global_step``.

    Attributes:
        updates: optimizer updates in order; each is a list of micro-batches (dicts for ``loss_fn``) whose
            gradients are summed into one optimizer step. Each micro-batch's loss is weighted by
            ``1 / len(update)``, so an update's gradient is the mean over its micro-batches.
        metrics: ``{name: (N,) or scalar}`` detached values measured while sampling and scoring
            (``objective/scores``, ``time/generation``, ...); logged as means over the logging window.
        samples: rows to append to ``samples.jsonl`` (main process; may be empty).
    """

    updates: list[list[dict[str, Any]]]
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


RolloutFn = Callable[[torch.nn.Module, list, int], Rollout]
"""``rollout_fn(model, prompts, step) -> Rollout``: called without gradients, ``step`` the 1-based
``global_step`` being built; ``model`` is the prepared (possibly DDP-wrapped) model."""


def build_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for ``config``: devices, processes, gradient accumulation, seeded data
    order; also sets the process's host-memory policy (``config.reuse_host_memory``,
    :func:`~alignlab.train.memory.configure_host_memory`). Call it before loading models so every process
    knows its device and the models' memory is allocated under that policy.

    Precision is not delegated to accelerate: its mixed-precision mode wraps the model's forward and casts
    every output back to float32, which for a language model is a ``(B, T, vocab)`` float32 copy of the
    logits per forward. :func:`autocast` is applied around the loss function instead.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, set_seed

    # accelerate keeps one global state per process; a second run in the same Python process (a notebook,
    # a comparison of methods) may want another precision, so start it afresh. The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # With no accelerator, say so: accelerate only sets up multi-process CPU training (gloo) when cpu=True.
    if hasattr(torch, "accelerator"):
        no_accelerator = torch.accelerator.current_accelerator() is None
    else:  # torch < 2.6
        no_accelerator = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=no_accelerator,
        mixed_precision="no",
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(config.seed)
    configure_host_memory(config.reuse_host_memory)
    return accelerator


def autocast(config: TrainConfig, device: torch.device):
    """The precision context for forward passes: bf16 autocast when ``config.bf16``, else a no-op."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)


def _fused_adamw_supported(params: list) -> bool:
    # torch's fused AdamW kernel runs on CPU and CUDA for floating-point parameters (torch >= 2.4).
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every ``nn.Dropout``'s probability to 0 (TRL: ``disable_dropout_in_model``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split for AdamW: matrices decay, vectors (biases, norm weights) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    metrics_path: Path
    plots: list[Path]
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


class Trainer:
    """Runs the optimisation for one algorithm.

    Args:
        config: the algorithm's config (a :class:`TrainConfig`).
        accelerator: from :func:`build_accelerator`.
        model: the policy (trainable parameters have ``requires_grad``), LoRA already applied if wanted.
        tokenizer: saved with the model.
        train_dataset, eval_dataset: sequences of examples for ``collate_fn``.
        collate_fn: list of examples -> batch dict of tensors (with ``attention_mask`` for token counting).
        loss_fn: see :data:`LossFn`; called under autocast, with the prepared (possibly DDP-wrapped) model.
        eval_dataset: optional held-out examples (offline algorithms).
        plot_panels: file stem -> metric names, for ``plots/*.png``.
        rollout_fn: see :data:`RolloutFn`; makes the loop online (module docstring). The data loader then
            yields lists of examples (``collate_fn`` is ignored), drops a last incomplete batch, and each
            ``global_step`` is one rollout.
        rollout_batch_size: examples per process per rollout (default ``per_device_train_batch_size``).
        model_to_save: picks what to save from the trained (unwrapped) model, e.g. the policy out of a
            policy-and-value module. Default: the model itself.
        frozen_models: other models the steps run forwards of (reference, reward models).

    While :meth:`train` runs, the float32 CPU linear layers of ``model`` and ``frozen_models`` compute with
    oneDNN (:func:`alignlab.ops.linear.onednn_float32_linear`); other precisions and devices are unchanged.
    """

    def __init__(
        self,
        config: TrainConfig,
        accelerator,
        model: torch.nn.Module,
        tokenizer,
        train_dataset,
        *,
        collate_fn: Callable,
        loss_fn: LossFn,
        eval_dataset=None,
        plot_panels: dict[str, list[str]] | None = None,
        rollout_fn: RolloutFn | None = None,
        rollout_batch_size: int | None = None,
        model_to_save: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        frozen_models: Sequence[torch.nn.Module | None] = (),
    ):
        if len(train_dataset) == 0:
            raise UserError("the training set is empty after preprocessing")
        self.rollout_fn = rollout_fn
        self.batch_size = rollout_batch_size or config.per_device_train_batch_size
        if rollout_fn is not None and len(train_dataset) < self.batch_size:
            raise UserError(
                f"one rollout takes {self.batch_size} prompts per process but the training set has only "
                f"{len(train_dataset)}"
            )
        self.model_to_save = model_to_save or (lambda m: m)
        self.frozen_models = [m for m in frozen_models if m is not None]
        self.config = config
        self.accelerator = accelerator
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) else None
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn
        self.plot_panels = {"loss": ["loss"], **(plot_panels or {})}
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.samples_path = self.output_dir / "samples.jsonl"
        self._eval_loader = None

    # ------------------------------------------------------------------------------------------------------
    def _loader(self, dataset, batch_size: int, shuffle: bool, online: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=list if online else self.collate_fn,
            num_workers=self.config.dataloader_num_workers,
            generator=generator,
            drop_last=online,
        )

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().float().reshape(-1)
        return self.accelerator.gather(value.to(self.accelerator.device)).cpu()

    def _record(self, store: dict[str, list[torch.Tensor]], loss: torch.Tensor, metrics: dict[str, torch.Tensor]):
        store["loss"].append(self._gather(loss))
        for name, value in metrics.items():
            store[name].append(self._gather(torch.as_tensor(value)))

    @staticmethod
    def _reduce(store: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        return {name: torch.cat(values).mean().item() for name, values in store.items() if values}

    # ------------------------------------------------------------------------------------------------------
    def evaluate(self, model, step: int) -> dict[str, float]:
        """Mean of the loss and metrics over the whole eval set, logged with the ``eval_`` prefix."""
        if self._eval_loader is None:
            self._eval_loader = self.accelerator.prepare(
                self._loader(self.eval_dataset, self.config.per_device_eval_batch_size, False)
            )
        loader = self._eval_loader
        was_training = model.training
        model.eval()
        store: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in loader:
                with autocast(self.config, self.accelerator.device):
                    loss, metrics = self.loss_fn(model, batch)
                self._record(store, loss, metrics)
        if was_training:
            model.train()
        result = {f"eval_{k}": v for k, v in self._reduce(store).items()}
        result["eval_runtime"] = time.perf_counter() - start
        if self.accelerator.is_main_process:
            self.metrics.append({"step": step, **result})
        return result

    def _save_checkpoint(self, step: int, epoch: int, steps_in_epoch: int) -> None:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f".checkpoint-{step}.partial"
        acc.wait_for_everyone()
        if acc.is_main_process and partial.exists():
            shutil.rmtree(partial)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"global_step": step, "epoch": epoch, "steps_in_epoch": steps_in_epoch}
            (partial / STATE_FILE).write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)  # a crash before this line leaves the previous checkpoint intact
            self._prune_checkpoints()
            plot_metrics(self.metrics.rows(), self.output_dir / "plots", self.plot_panels)
        acc.wait_for_everyone()

    def _optimizer_step(self, model, optimizer) -> torch.Tensor:
        """Clip, step and zero the gradients; returns the global gradient norm before clipping."""
        cfg, acc = self.config, self.accelerator
        if cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        optimizer.step()
        # Reusing host memory (the default), the gradients are dropped: the next backward's gradients then
        # become the .grad tensors as they are, instead of being added into zeroed buffers (two more passes
        # over every parameter's gradient per step). Without reuse the buffers are kept: freeing them hands
        # tensors over 32 MB back to the OS, and re-mapping them costs a page fault per 4 KB (glibc malloc).
        optimizer.zero_grad(set_to_none=cfg.reuse_host_memory)
        return grad_norm

    def _backward_terms(self, model, batch: dict, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``loss_fn`` on ``batch`` and back-propagate ``scale`` times its loss, term by term when it yields
        several (see :data:`LossFn`); returns the detached total loss and the merged metrics."""
        acc = self.accelerator
        with autocast(self.config, acc.device):
            result = self.loss_fn(model, batch)
        terms = iter([result]) if isinstance(result, tuple) else result
        total, merged = None, {}
        while True:
            with autocast(self.config, acc.device):  # a generator's forward runs inside next()
                term = next(terms, None)
            if term is None:
                break
            loss, metrics = term
            acc.backward(loss * scale)
            total = loss.detach() if total is None else total + loss.detach()
            merged.update(metrics)
        if total is None:
            raise RuntimeError("loss_fn yielded no loss")
        return total, merged

    def _online_step(self, model, optimizer, prompts: list, step: int, store) -> tuple[torch.Tensor, int, float]:
        """One rollout and its updates; returns ``(last grad norm, tokens trained on, seconds spent training)``."""
        acc = self.accelerator
        model.eval()
        with torch.no_grad():
            rollout = self.rollout_fn(model, prompts, step)
        model.train()
        for name, value in rollout.metrics.items():
            store[name].append(self._gather(torch.as_tensor(value)))
        if rollout.samples and acc.is_main_process:
            with open(self.samples_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rollout.samples)
        start = time.perf_counter()
        tokens = 0
        grad_norm = torch.tensor(0.0)
        for micro_batches in rollout.updates:
            # accelerate's backward divides by gradient_accumulation_steps; weight each micro-batch by
            # 1 / len(update) instead, and synchronise gradients across processes on the last one only.
            scale = acc.gradient_accumulation_steps / len(micro_batches)
            for i, batch in enumerate(micro_batches):
                sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else acc.no_sync(model)
                with sync:
                    loss, metrics = self._backward_terms(model, batch, scale)
                self._record(store, loss, metrics)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = self._optimizer_step(model, optimizer)
        return grad_norm, tokens, time.perf_counter() - start

    def _prune_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit:
            for _, path in list_checkpoints(self.output_dir)[:-limit]:
                shutil.rmtree(path, ignore_errors=True)

    def _resolve_resume(self) -> Path | None:
        spec = self.config.resume_from_checkpoint
        if not spec:
            return None
        if str(spec).lower() == "true":
            path = find_latest_checkpoint(self.output_dir)
            if path is None:
                raise UserError(f"--resume_from_checkpoint true: no checkpoint-N in {self.output_dir}")
            return path
        path = Path(spec)
        if not (path / STATE_FILE).exists():
            raise UserError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint directory")
        return path

    # ------------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run to ``max_steps`` (or ``num_train_epochs``), then evaluate, save the model and draw plots."""
        with onednn_float32_linear(self.model, *self.frozen_models):
            return self._train()

    def _train(self) -> TrainResult:
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            with open(self.output_dir / "config.yaml", "w", encoding="utf-8") as handle:
                yaml.safe_dump(asdict(cfg), handle, sort_keys=False)

        online = self.rollout_fn is not None
        train_loader = self._loader(self.train_dataset, self.batch_size, True, online=online)
        groups = parameter_groups(self.model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            fused=_fused_adamw_supported([p for g in groups for p in g["params"]]),
        )
        model, optimizer, train_loader = acc.prepare(self.model, optimizer, train_loader)
        per_step = 1 if online else cfg.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(len(train_loader) / per_step))
        total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        acc.register_for_checkpointing(scheduler)

        global_step, start_epoch, skip_steps = 0, 0, 0
        resume = self._resolve_resume()
        if resume is not None:
            acc.load_state(str(resume))
            state = json.loads((resume / STATE_FILE).read_text())
            global_step, start_epoch, skip_steps = state["global_step"], state["epoch"], state["steps_in_epoch"]
            if acc.is_main_process:
                self.metrics.truncate_after(global_step)
            logger.info("resumed from %s at step %d", resume, global_step)
        elif acc.is_main_process:
            for stale in (self.metrics.path, self.samples_path):  # a fresh run in an old directory starts afresh
                if stale.exists():
                    stale.unlink()

        store: dict[str, list[torch.Tensor]] = defaultdict(list)
        tokens = 0
        # num_tokens (TRL's name): tokens through the forward/backward passes since the start, all processes
        done_rows = self.metrics.rows() if acc.is_main_process and global_step else []
        num_tokens = int(done_rows[-1].get("num_tokens", 0)) if done_rows else 0
        train_time = 0.0  # online: seconds spent in updates within the logging window
        window_start = time.perf_counter()
        train_start = time.perf_counter()
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        bar = tqdm(total=total_steps, initial=global_step, disable=not acc.is_main_process, desc="training", unit="step")
        model.train()
        epoch = start_epoch
        try:
            while global_step < total_steps:
                train_loader.set_epoch(epoch)
                loader = train_loader
                steps_in_epoch = 0
                if skip_steps:
                    loader = acc.skip_first_batches(train_loader, skip_steps * per_step)
                    steps_in_epoch, skip_steps = skip_steps, 0
                for batch in loader:
                    if online:
                        grad_norm, step_tokens, seconds = self._online_step(model, optimizer, batch, global_step + 1, store)
                        tokens += step_tokens
                        train_time += seconds
                        store["time/training"].append(self._gather(torch.tensor(seconds)))
                        scheduler.step()
                        if self.accelerator.device.type == "cpu":
                            release_free_memory()
                    else:
                        with acc.accumulate(model):
                            loss, metrics = self._backward_terms(model, batch, 1.0)
                            self._record(store, loss, metrics)
                            tokens += int(self._gather(batch["attention_mask"].sum()).sum())
                            if not acc.sync_gradients:
                                continue
                            grad_norm = self._optimizer_step(model, optimizer)
                            scheduler.step()
                            if self.accelerator.device.type == "cpu":
                                release_free_memory()
                    global_step += 1
                    steps_in_epoch += 1
                    bar.update(1)
                    is_last = global_step >= total_steps
                    if global_step % cfg.logging_steps == 0 or is_last:
                        elapsed = time.perf_counter() - window_start
                        row = {"step": global_step, "epoch": round(epoch + steps_in_epoch / steps_per_epoch, 4)}
                        row.update(self._reduce(store))
                        row["learning_rate"] = scheduler.get_last_lr()[0]
                        row["grad_norm"] = float(grad_norm)
                        if online:  # tokens through the updates, summed over processes: per second of the
                            # whole window (sampling included), and per second spent in the updates
                            rates = torch.tensor([tokens / elapsed if elapsed > 0 else 0.0,
                                                  tokens / train_time if train_time > 0 else 0.0])
                            total = self.accelerator.gather(rates.to(acc.device).unsqueeze(0)).sum(0).tolist()
                            row["tokens_per_second"], row["tokens_per_second/train"] = total
                        else:
                            row["tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
                        num_tokens += int(self._gather(torch.tensor(tokens)).sum()) if online else tokens
                        row["num_tokens"] = num_tokens
                        if acc.is_main_process:
                            self.metrics.append(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                        last_train = row
                        store.clear()
                        tokens = 0
                        train_time = 0.0
                        window_start = time.perf_counter()
                    if self.eval_dataset is not None and cfg.eval_steps and global_step % cfg.eval_steps == 0 and not is_last:
                        last_eval = self.evaluate(model, global_step)
                        window_start = time.perf_counter()
                    if cfg.save_steps and global_step % cfg.save_steps == 0 and not is_last:
                        self._save_checkpoint(global_step, epoch, steps_in_epoch)
                        window_start = time.perf_counter()
                    if is_last:
                        break
                epoch += 1
        finally:
            bar.close()  # ends the bar's line, so an error message starts on its own
        train_seconds = time.perf_counter() - train_start

        if self.eval_dataset is not None:
            last_eval = self.evaluate(model, global_step)
        acc.wait_for_everyone()
        plots: list[Path] = []
        if acc.is_main_process:
            to_save = self.model_to_save(acc.unwrap_model(model))
            save_pretrained(to_save, self.tokenizer, self.output_dir, merge_lora=cfg.merge_lora)
            plots = plot_metrics(self.metrics.rows(), self.output_dir / "plots", self.plot_panels)
        acc.wait_for_everyone()
        self.model = acc.unwrap_model(model)
        return TrainResult(
            output_dir=self.output_dir,
            metrics_path=self.metrics.path,
            plots=plots,
            global_step=global_step,
            train_metrics=last_train,
            eval_metrics=last_eval,
            train_seconds=train_seconds,
        )
