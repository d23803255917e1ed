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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_FLOATS = (torch.float32, torch.bfloat16)


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
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [None], "")

    return forward


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
    switched: list[torch.nn.Linear] = []
    if onednn_linear_available():
        bf16_ok = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        for module in model.modules():
            if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
                continue
            weight, bias = module.weight, module.bias
            dtype = _compute_dtype(weight.dtype)
            if weight.device.type != "cpu" or dtype is None or (dtype == torch.bfloat16 and not bf16_ok):
                continue
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows)
            bias = None if bias is None else bias.detach().to(dtype)
            module.forward = _reordered_forward(module, dtype, reordered, bias, module.forward)
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
