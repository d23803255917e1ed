"""Linear layers with their weights reordered once for oneDNN, for inference passes that reuse them many times.

Decoding multiplies each weight matrix by a handful of rows (one new token per sequence), once per generated
token. On CPU, PyTorch runs float32 ``F.linear`` through MKL's ``sgemm``, which re-packs the whole weight on
every call; at 16 rows that made the products of the embedded model stream their weights at 4-8 GB/s on the
2-core machines measured, against 30-60 GB/s for a plain read. oneDNN's inner-product primitive with the
weight reordered ahead of time (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the
pair TorchInductor uses for frozen CPU models) skips the per-call packing: 2-3.5x faster at 16 rows and no
slower at hundreds (``benchmarks/linear.py``). :func:`reordered_linear_weights` applies it to a model for the
length of a ``with`` block, for :func:`~alignlab.rollout.generation.sample_completions`.

Only float32 ``nn.Linear`` layers on CPU are switched, and each call falls back to the layer's own forward
whenever the reordered copy could differ from it: gradients being recorded, CPU autocast on, or an input
that is not a float32 CPU tensor. The results equal ``F.linear``'s up to float32 rounding (the products are
summed in another order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and the reordered-weight linear operators."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def _reordered_forward(
    module: torch.nn.Linear, weight: torch.Tensor, own_forward: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))
        ):
            return own_forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, "none", [None], "")

    return forward


@contextlib.contextmanager
def reordered_linear_weights(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Run ``model``'s float32 CPU ``nn.Linear`` layers from oneDNN-reordered copies of their weights.

    For inference passes that call each layer many times with unchanged weights (decoding). The copies are
    made on entry (one read and write of every switched weight: an extra float32 copy of them is held until
    the block ends) and dropped on exit, when every layer gets its own forward back, also on an error.
    Changing a weight inside the block is not seen by the copies; gradient-recording calls, autocast and
    non-float32 inputs run the layer's own forward (module docstring). Layers of other types (including
    subclasses of ``nn.Linear`` and peft's LoRA wrappers, whose inner ``nn.Linear`` layers are switched) and
    other dtypes or devices are left alone; so is everything when :func:`onednn_linear_available` is false.

    Args:
        model: any module.
        rows: the number of input rows the calls will mostly have (oneDNN picks the weight layout for it;
            other row counts still work), e.g. the sequences decoded at once.

    Yields:
        The number of layers switched (0 when nothing applies).
    """
    switched: list[torch.nn.Linear] = []
    if onednn_linear_available():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is not torch.nn.Linear or weight.dtype != torch.float32
                    or weight.device.type != "cpu" or "forward" in module.__dict__):
                continue
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            module.forward = _reordered_forward(module, reordered, module.forward)
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
