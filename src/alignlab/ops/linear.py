"""Linear layers with their weights reordered once for oneDNN, for inference passes that reuse them many times.

Decoding multiplies each weight matrix by a handful of rows (one new token per sequence), once per generated
token. On CPU, PyTorch runs a float32 ``F.linear`` through MKL's ``sgemm``, which re-packs the whole weight on
every call, and a bf16 one under autocast first casts the float32 weight to bf16, every call. At 16 rows that
made the products of the embedded model stream their weights at 5-9 GB/s on the 2-core machine measured,
against 30-60 GB/s for a plain read. oneDNN's inner-product primitive with the weight reordered (and cast)
ahead of time (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the pair TorchInductor
uses for frozen CPU models) skips that per-call work: 1.6-3x faster at 16 rows and no slower at 640
(``benchmarks/linear.py``). :func:`reordered_linear_weights` applies it to a model for the length of a
``with`` block; :func:`~alignlab.rollout.generation.sample_completions` decodes inside one.

Each call falls back to the layer's own forward whenever the reordered copy could differ from it: gradients
being recorded, a precision other than the one the copy was made for (float32 without autocast, or bf16
under CPU bf16 autocast or for bf16 weights), or an input off the CPU. The results equal ``F.linear``'s up to
float32 rounding (the products are summed in another order); under bf16 autocast they are bf16, as
autocast's.

Training and scoring forwards multiply each weight by hundreds to thousands of rows, once per optimizer step,
so there is nothing to reorder ahead of time; but oneDNN's matmul on the plain weight still beat MKL's
float32 ``sgemm`` there: a packed PPO batch of the embedded model (1,504 tokens) took 1.09x less time for the
forward and backward and 1.29x less for a forward without gradients (``benchmarks/linear_training.py``,
benchmarks/README.md). :func:`onednn_float32_linear` switches float32 CPU ``nn.Linear`` layers to it,
forward and input gradient, for the length of a ``with`` block; the CPU speed layer
(:mod:`alignlab.ops.cpu_kernels`) turns both switches on and off. The two switches nest: decoding inside the block
uses reordered copies, and the block's own forward comes back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_FLOATS = (torch.float32, torch.bfloat16)
_MARK = "_alignlab_linear"
"""Attribute set on the forwards this module installs, so that its two switches can nest."""


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and the reordered-weight linear operators."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``F.linear`` would multiply in right now for a CPU weight of ``weight_dtype``, if one a
    reordered copy serves (float32 or bf16), else ``None``."""
    if torch.is_autocast_enabled("cpu"):
        autocast_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.bfloat16 if autocast_bf16 and weight_dtype in _FLOATS else None
    return weight_dtype if weight_dtype in _FLOATS else None


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` by oneDNN: ``x`` ``(..., in)``, ``weight`` ``(out, in)``, any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def _reordered_forward(
    module: torch.nn.Linear,
    dtype: torch.dtype,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    own_forward: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        if (
            x.device.type != "cpu"
            or _compute_dtype(module.weight.dtype) != dtype
            or x.dtype != dtype and not (autocast and x.dtype in _FLOATS)
            or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))
        ):
            return own_forward(x)
        return _onednn_matmul(x.to(dtype), weight, bias)

    setattr(forward, _MARK, True)
    return forward


def _switchable_forward(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The forward a switch would fall back to: an exact ``nn.Linear``'s own, or one this module installed;
    ``None`` for other modules and for layers whose forward someone else replaced (e.g. accelerate's hooks)."""
    if type(module) is not torch.nn.Linear:
        return None
    installed = module.__dict__.get("forward")
    if installed is None:
        return module.forward
    return installed if getattr(installed, _MARK, False) else None


def _restore(switched: list[tuple[torch.nn.Module, Callable | None]]) -> None:
    for module, previous in switched:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@contextlib.contextmanager
def reordered_linear_weights(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Run ``model``'s CPU ``nn.Linear`` layers from oneDNN-reordered copies of their weights.

    For inference passes that call each layer many times with unchanged weights (decoding). The copies are
    made on entry, in the precision the layers compute in at that moment: bf16 under CPU bf16 autocast
    (float32 or bf16 weights) or for bf16 weights, float32 for float32 weights without autocast. Making them
    costs one read and write of every switched weight, and they are held (an extra copy of those weights, in
    that precision) until the block ends; on exit, also on an error, every layer gets its own forward back.
    Changing a weight inside the block is not seen by the copies; gradient-recording calls, inputs off the
    CPU, and calls in another precision than the copies' run the layer's own forward (module docstring).
    Layers of other types (including subclasses of ``nn.Linear`` and peft's LoRA wrappers, whose inner
    ``nn.Linear`` layers are switched), other weight dtypes or devices are left alone; so is everything when
    :func:`onednn_linear_available` is false, and bf16 copies where oneDNN has no bf16 on this CPU.

    Args:
        model: any module.
        rows: the number of input rows the calls will mostly have (oneDNN picks the weight layout for it;
            other row counts still work), e.g. the sequences decoded at once.

    Yields:
        The number of layers switched (0 when nothing applies).
    """
    switched: list[tuple[torch.nn.Module, Callable | None]] = []
    if onednn_linear_available():
        bf16_ok = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        for module in model.modules():
            own_forward = _switchable_forward(module)
            if own_forward is None:
                continue
            weight, bias = module.weight, module.bias
            dtype = _compute_dtype(weight.dtype)
            if weight.device.type != "cpu" or dtype is None or (dtype == torch.bfloat16 and not bf16_ok):
                continue
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows)
            bias = None if bias is None else bias.detach().to(dtype)
            switched.append((module, module.__dict__.get("forward")))
            module.forward = _reordered_forward(module, dtype, reordered, bias, own_forward)
    try:
        yield len(switched)
    finally:
        _restore(switched)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` in float32 with oneDNN computing the output and the input's gradient (``grad @ weight``,
    a linear layer with the transposed weight); the weight's gradient ``grad.T @ x`` and the bias's stay with
    ``torch.mm`` and ``sum``, as in ``F.linear``'s own backward (oneDNN was no faster there). Saves the same
    tensors as ``F.linear`` (input and weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad, weight.t(), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


_LINEAR_FORWARD = torch.nn.Linear.forward
"""``nn.Linear``'s own forward, which :func:`onednn_float32_linear` falls back to and restores."""


def _onednn_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` while :func:`onednn_float32_linear` is on: oneDNN for float32 CPU inputs and weights
    outside autocast, the layer's own forward for everything else."""
    weight = self.weight
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dim() < 2
        or x.numel() == 0
        or torch.is_autocast_enabled("cpu")
    ):
        return _LINEAR_FORWARD(self, x)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or self.bias is not None and self.bias.requires_grad):
        return _OneDNNLinear.apply(x, weight, self.bias)
    return _onednn_matmul(x, weight, self.bias)


@contextlib.contextmanager
def onednn_float32_linear() -> Iterator[bool]:
    """Compute every float32 CPU ``nn.Linear`` layer of the process with oneDNN's matmul on its own weights, for
    the length of a ``with`` block (``nn.Linear.forward`` is swapped, so every model is covered: the trained
    one, a reference, a reward model).

    For forwards over many rows with weights that change between them (training) or are used once (scoring).
    No copies are made and the same tensors are saved for backward as by ``F.linear``. A call runs the
    layer's own forward unless input and weight are float32 on the CPU, without autocast, and the input has at
    least one row and two dimensions. Results and gradients equal ``F.linear``'s up to float32 rounding
    (products summed in another order; ``tests/test_ops_linear.py``). Double backward is not supported (the
    training loop never takes one). Layers whose forward is their own (``nn.Linear`` and subclasses that keep
    it; peft's LoRA wrappers hold such layers) are covered; a forward installed on one layer (accelerate's
    hooks, :func:`reordered_linear_weights`) wins over it. Nothing changes when :func:`onednn_linear_available`
    is false. On exit, also on an error, ``nn.Linear.forward`` is restored; nested blocks are no-ops.

    Yields:
        Whether the switch took effect (False without oneDNN, or inside another such block).
    """
    switch = onednn_linear_available() and torch.nn.Linear.forward is _LINEAR_FORWARD
    if switch:
        torch.nn.Linear.forward = _onednn_linear_forward
    try:
        yield switch
    finally:
        if switch:
            torch.nn.Linear.forward = _LINEAR_FORWARD
