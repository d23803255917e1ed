"""One optimizer update of the training loop: the micro-batches' forwards and backwards (:func:`run_update`),
then the one optimizer-step path, :func:`guarded_optimizer_step` (the runtime's after-backward hook, clipping,
the step unless the update is not finite). Offline and online steps both come down to these two."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

LossTerms = Iterable[tuple[torch.Tensor, dict[str, Any]]]
"""What a loss function returns: one or more ``(scalar loss, {name: (B,) or scalar detached metric})`` terms.
The loop back-propagates each term before asking for the next, so a term's forward can run after the previous
term's activations are freed (PPO: the policy, then the value model); a generator or a one-element list both
do. A micro-batch's loss is the sum of its terms, its metrics their union."""

LossFn = Callable[[torch.nn.Module, dict[str, Any]], LossTerms]
"""``loss_fn(model, batch) -> LossTerms``; called under the loop's precision context."""


def backward_terms(accelerator, precision: Callable[[], contextlib.AbstractContextManager], loss_fn: LossFn,
                   model, batch: dict[str, Any], scale: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``loss_fn`` on ``batch`` and back-propagate ``scale`` times each of its terms; returns the detached
    total loss and the merged metrics.

    Raises:
        RuntimeError: ``loss_fn`` gave no term.
    """
    with precision():
        terms = iter(loss_fn(model, batch))
    total, merged = None, {}
    while True:
        with precision():  # a generator's forward runs inside next()
            term = next(terms, None)
        if term is None:
            break
        loss, metrics = term
        accelerator.backward(loss * scale)
        total = loss.detach() if total is None else total + loss.detach()
        merged.update(metrics)
    if total is None:
        raise RuntimeError("loss_fn gave no loss term")
    return total, merged


def evaluate_terms(precision, loss_fn: LossFn, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``loss_fn``'s terms on ``batch`` without gradients: the summed loss and the merged metrics."""
    total, merged = None, {}
    with torch.no_grad(), precision():
        for loss, metrics in loss_fn(model, batch):
            total = loss.detach() if total is None else total + loss.detach()
            merged.update(metrics)
    if total is None:
        raise RuntimeError("loss_fn gave no loss term")
    return total, merged


def offloading(precision: Callable[[], contextlib.AbstractContextManager], *,
               pin_memory: bool = False) -> Callable[[], contextlib.AbstractContextManager]:
    """``precision`` with activation offloading: inside it the tensors autograd saves for the backward pass are
    moved to CPU memory and brought back when the backward needs them
    (``torch.autograd.graph.save_on_cpu``, pinned with ``pin_memory`` for faster copies from a GPU). TRL's
    ``activation_offloading`` (its ``get_act_offloading_ctx_manager``, the same saved-tensor hooks): less
    accelerator memory for the activations, the same numbers; on a CPU device the tensors stay where they are."""

    @contextlib.contextmanager
    def context():
        with precision(), torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            yield

    return context


def run_update(accelerator, precision, loss_fn: LossFn, model, micro_batches: list[dict[str, Any]],
               record: Callable[[torch.Tensor, dict[str, Any]], None],
               substep_end: Callable[[], Any] | None = None) -> int:
    """Forward and backward every micro-batch of one optimizer update, each loss weighted ``1 / len(update)``
    (the update's gradient is the mean over its micro-batches), gradients synchronised across processes on the
    last one only. ``record(loss, metrics)`` is called per micro-batch, and ``substep_end()`` after each but the
    last (transformers' ``on_substep_end``: a gradient-accumulation micro-step). Returns this process's tokens
    (``attention_mask`` sums)."""
    scale = 1.0 / len(micro_batches)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            loss, metrics = backward_terms(accelerator, precision, loss_fn, model, batch, scale)
        record(loss, metrics)
        tokens += int(batch["attention_mask"].sum())
        if not last and substep_end is not None:
            substep_end()
    return tokens


def _clipped_grad_norm(accelerator, model, max_grad_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping; the gradients clipped to ``max_grad_norm`` (0: not clipped)."""
    if max_grad_norm > 0:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def all_finite(accelerator, values: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every tensor in ``values`` is finite on every process (one gather when there are
    several processes, so that all of them take the same decision)."""
    ok = all(bool(torch.isfinite(v.detach()).all()) for v in values)
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(ok)], device=accelerator.device)
        ok = bool(accelerator.gather(flag).min() > 0)
    return ok


def guarded_optimizer_step(runtime, model, optimizer, max_grad_norm: float, *, losses_finite: bool = True,
                           before_step: Callable[[], Any] | None = None,
                           after_step: Callable[[], Any] | None = None) -> tuple[torch.Tensor, bool]:
    """The optimizer step of one update, after its last backward: the runtime's after-backward hook
    (:meth:`~alignlab.train.runtime.Runtime.after_backward`: the CPU speed layer hands the activations' freed
    memory back), the gradients clipped to ``max_grad_norm`` (0: no clipping), the step, and the gradients
    dropped (``zero_grad(set_to_none=True)``: the next backward's gradients become ``.grad`` as they are).

    The step is skipped when the update is not finite: if ``losses_finite`` is False (the loss of a
    micro-batch was NaN or infinite on some process, see :func:`all_finite`) or the global gradient norm is
    not finite, the gradients are dropped and the optimizer does not step (its moments and step count stay as
    they were), so one bad batch cannot write NaN into the weights. The gradient norm is computed after the
    gradients are synchronised, so every process decides alike. The same guard as mixed-precision loss
    scaling's skipped steps (``torch.amp.GradScaler``: ``optimizer.step`` is skipped when the unscaled
    gradients hold inf or NaN), applied to every update.

    Args:
        runtime: the run's :class:`~alignlab.train.runtime.Runtime` (its accelerator clips across processes).
        before_step, after_step: called right before and after ``optimizer.step()`` (after the clipping, before
            the gradients are dropped), when the optimizer steps: transformers' ``on_pre_optimizer_step`` and
            ``on_optimizer_step``.

    Returns:
        ``(grad_norm, stepped)``: the global gradient norm before clipping (NaN or inf when skipped for the
        gradient) and whether the optimizer stepped.
    """
    runtime.after_backward()
    grad_norm = _clipped_grad_norm(runtime.accelerator, model, max_grad_norm)
    stepped = losses_finite and bool(torch.isfinite(grad_norm))
    if stepped:
        if before_step is not None:
            before_step()
        optimizer.step()
        if after_step is not None:
            after_step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


class NonfiniteSteps:
    """How many optimizer updates were skipped for a non-finite loss or gradient, and the limit on them.

    Registered with accelerate's ``register_for_checkpointing`` (``state_dict`` / ``load_state_dict``), so a
    resumed run goes on counting from the checkpoint's number.

    Args:
        limit: ``--max_nonfinite_steps``: more skipped updates than this stop the run.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_steps": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["nonfinite_steps"])

    def record(self) -> bool:
        """Count one skipped update; returns whether the count is now over the limit."""
        self.count += 1
        return self.count > self.limit
