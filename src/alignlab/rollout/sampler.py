"""A bfloat16 copy of the policy that samples rollouts in its place (``--rollout_weights bfloat16``).

Under bf16 autocast the policy keeps float32 master weights and every matrix product first casts its weight
to bf16; a copy of the weights already in bf16, refreshed from the policy before every rollout, skips those
casts. Its matrix products round the weights as autocast does; the norms and residual additions run in bf16
rather than float32, so its distribution differs slightly from the policy's, which the losses correct with
truncated importance sampling (:func:`alignlab.losses.ppo.importance_sampling_ratio`), as TRL does for vLLM
rollouts. On the 2-core CPU measured it sampled no faster than the policy itself inside a GRPO step, so it
is off by default (docs/rollouts.md has the measurements).

Int8 copies were tried and rejected: PyTorch's dynamic int8 quantization (int8 activations per tensor) put
the sampling distribution of SmolLM2-135M about 2 nats per token (KL) away from the policy's, and weight-only
int8 (``torch._weight_int8pack_mm``) decoded no faster than bf16 on the CPU.
"""

from __future__ import annotations

import copy

import torch

from alignlab.errors import UserError


class RolloutSampler:
    """A copy of a causal LM with its parameters in ``dtype`` for ``generate``, kept in step with the policy.

    Buffers (rotary frequencies) stay as they are; :meth:`sync` copies the policy's current parameters in
    (a cast, ~0.1 s for a 135M model on a CPU) and is called before each rollout.

    Args:
        policy: the unwrapped policy (a ``transformers`` causal LM, not peft-wrapped).
        dtype: the copy's parameter dtype (``torch.bfloat16``).

    Raises:
        UserError: the policy is a peft model (its adapters would have to be merged into every copy).
    """

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        from alignlab.models import is_peft_model

        if is_peft_model(policy):
            raise UserError("--rollout_weights bfloat16 does not support --use_peft yet; drop one of them")
        self.dtype = dtype
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        for param in self.model.parameters():
            param.data = param.data.to(dtype)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy ``policy``'s current parameters into the copy (cast to its dtype)."""
        source = dict(policy.named_parameters())
        for name, param in self.model.named_parameters():
            param.copy_(source[name].detach())
