"""An int8 copy of the policy for sampling rollouts on the CPU (``--rollout_quantization int8``).

Decoding a small model on a CPU is bound by reading its weights once per generated token; with int8 weights
(PyTorch's dynamic quantization: int8 weights per output channel, activations quantized on the fly by
FBGEMM) a decode step reads a quarter of the bytes. The copy is refreshed from the policy's float weights
before every rollout, so it is the current policy up to rounding; the tokens it samples come from a slightly
different distribution than the policy's, which the losses correct with truncated importance sampling
(:func:`alignlab.losses.ppo.importance_sampling_ratio`), as TRL does for vLLM rollouts.
"""

from __future__ import annotations

import copy
import warnings

import torch

from alignlab.errors import UserError


def _quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` float weight -> per-output-channel symmetric qint8 (scale ``max|w_row| / 127.5``, the
    scale of PyTorch's ``per_channel_dynamic_qconfig`` observer)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.5).clamp(min=1e-8).double()
    zero_points = torch.zeros(w.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)


class Int8Sampler:
    """A dynamically quantized int8 copy of a causal LM for ``generate``, kept in step with the policy.

    Every ``torch.nn.Linear`` (the output head included) becomes an int8 FBGEMM linear; embeddings and norms
    stay float32 copies. :meth:`sync` re-quantizes from the policy's current weights (about 0.3 s for a 135M
    model) and is called before each rollout.

    Args:
        policy: the unwrapped policy (a ``transformers`` causal LM on the CPU, not peft-wrapped).

    Raises:
        UserError: the policy is not on the CPU (FBGEMM int8 kernels are CPU only) or is a peft model.
    """

    def __init__(self, policy: torch.nn.Module):
        from alignlab.models import is_peft_model

        if is_peft_model(policy):
            raise UserError("--rollout_quantization int8 does not support --use_peft yet; drop one of them")
        if next(policy.parameters()).device.type != "cpu":
            raise UserError("--rollout_quantization int8 runs on the CPU only (PyTorch's int8 kernels are FBGEMM)")
        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it will move to torchao
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            float_copy = copy.deepcopy(policy).float().eval().requires_grad_(False)
            self.model = quantize_dynamic(
                float_copy, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
        self._linears = [name for name, m in policy.named_modules() if isinstance(m, torch.nn.Linear)]

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy ``policy``'s current weights into the int8 model (quantizing the linear layers)."""
        source = dict(policy.named_modules())
        target = dict(self.model.named_modules())
        for name in self._linears:
            src = source[name]
            bias = None if src.bias is None else src.bias.detach().float()
            target[name].set_weight_bias(_quantize_weight(src.weight), bias)
        params = dict(policy.named_parameters())
        for name, param in self.model.named_parameters():
            param.copy_(params[name].detach())
