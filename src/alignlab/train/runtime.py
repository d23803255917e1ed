"""The runtime: where and how models run in one process, owned in one place.

A :class:`Runtime` holds the device, the precision (bf16 autocast), the distribution (accelerate: processes,
DDP, and FSDP2 sharding through :mod:`alignlab.train.distributed`) and the CPU speed layer's process setting and
step hooks (:mod:`alignlab.ops.cpu_kernels`, :mod:`alignlab.ops.memory`). Algorithms ask it for what they need
and import none of those modules:

* ``runtime.device``, ``runtime.accelerator``, ``runtime.is_main_process``;
* ``runtime.precision()``: the autocast context for forward passes;
* ``runtime.prepare_model(model)``: a freshly loaded model ready to train (no KV cache, dropout off, LoRA,
  gradient checkpointing, on the device); ``runtime.frozen_model(model)``: a reference or reward model (frozen,
  on the device, sharded with FSDP2 when the trained model is);
* ``runtime.sampling(policy)``: the model to sample from (an FSDP2 policy all-gathered once for the block);
* ``runtime.is_sharded(model)``, ``runtime.unwrap(model)``, ``runtime.gather(tensor)``.

The training loop (:class:`~alignlab.train.loop.Trainer`) also uses ``runtime.training()`` (the speed layer for
the run), ``runtime.prepare(...)`` (accelerate's ``prepare`` with FSDP2's wrap units), ``runtime.after_backward()``
and ``runtime.after_optimizer_step()`` (the speed layer's memory trims, from the one optimizer-step path
:func:`~alignlab.train.steps.guarded_optimizer_step`) and ``runtime.full_state_dict(...)`` (saving a sharded
model). The CPU speed layer's decoding context (oneDNN-reordered weights) is entered by the generation engines
around each decoding call (:mod:`alignlab.rollout.engines`), which know how many rows they decode at once.

:func:`build_runtime` makes the runtime of a training run (the successor of ``build_accelerator``); a
``Runtime(config)`` without an accelerator is that of an inference-only stage (``score``, ``evaluate``, pair
sampling): the device PyTorch finds and the config's precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from alignlab.ops import cpu_kernels
from alignlab.train import distributed


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every ``nn.Dropout``'s probability to 0 (TRL: ``disable_dropout_in_model``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class Runtime:
    """Device, precision, distribution and the CPU speed layer of one process (module docstring).

    Args:
        config: the run's config (a :class:`~alignlab.train.config.TrainConfig`; an inference stage's config
            needs ``bf16`` only). ``None``: no precision (float32) and no training set-up.
        accelerator: the run's ``accelerate.Accelerator`` (from :func:`build_runtime`); ``None`` for an
            inference-only stage, which runs in one process on ``device``.
        device: the device when there is no accelerator (default: the accelerator PyTorch finds, else the CPU,
            :func:`alignlab.models.default_device`).
    """

    def __init__(self, config: Any = None, accelerator=None, *, device: torch.device | None = None):
        from alignlab.models import default_device

        self.config = config
        self.accelerator = accelerator
        if accelerator is not None:
            self.device = accelerator.device
        else:
            self.device = torch.device(device) if device is not None else default_device()
        self.bf16 = getattr(config, "bf16", False)

    # -- processes -----------------------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` without the DDP / FSDP wrapper accelerate's ``prepare`` put around it."""
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (``(k, ...)``) of every process concatenated (``(k * processes, ...)``), on the CPU."""
        if self.accelerator is None:
            return value.cpu()
        return self.accelerator.gather(value.to(self.device)).cpu()

    # -- precision -----------------------------------------------------------------------------------------
    def precision(self) -> contextlib.AbstractContextManager:
        """A fresh precision context for forward passes: bf16 autocast on the runtime's device when the config
        asks for ``bf16``, else a no-op. Precision is not delegated to accelerate: its mixed-precision mode
        casts every output back to float32, a ``(B, T, vocab)`` copy of the logits per forward."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- models --------------------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, *, task_type: str = "CAUSAL_LM",
                      modules_to_save: list[str] | None = None) -> torch.nn.Module:
        """Ready a freshly loaded model for training as the config asks: no KV cache, dropout off when
        ``disable_dropout``, LoRA adapters when ``use_peft`` (peft ``task_type``, ``modules_to_save``),
        gradient checkpointing when asked (unset, "auto": :meth:`auto_checkpointing`, which the loop calls once it
        knows the data), then moved to the device. Returns the (possibly peft-wrapped) model.

        Raises:
            UserError: ``--lora_target_modules`` names no layer of the model.
        """
        from alignlab.models import apply_lora

        from alignlab.train import checkpointing
        from alignlab.train.trl_args import prepare_options

        config = self.config
        model.config.use_cache = bool(getattr(config, "use_cache", False))
        if config.disable_dropout:
            disable_dropout(model)
        if config.use_peft:
            model = apply_lora(
                model,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                task_type=task_type,
                modules_to_save=[*(modules_to_save or []), *(getattr(config, "lora_modules_to_save", None) or [])]
                or None,
                use_rslora=getattr(config, "use_rslora", False),
                use_dora=getattr(config, "use_dora", False),
                target_parameters=getattr(config, "lora_target_parameters", None),
            )
        if config.gradient_checkpointing:  # unset (auto): decided by the loop once it knows the data
            checkpointing.enable(model, config)
        elif getattr(config, "activation_checkpointing", None):  # transformers 5's name, with its own options
            model.activation_checkpointing_enable(**(config.activation_checkpointing_kwargs or {}))
        prepare_options(model, config)
        if getattr(model, "is_quantized", False):  # bitsandbytes weights are placed when loaded
            return model
        return model.to(self.device)

    def auto_checkpointing(self, model: torch.nn.Module, dataset, collate_fn, *, online: bool) -> bool:
        """``--gradient_checkpointing auto``: turn checkpointing on in ``model`` (prepared by
        :meth:`prepare_model`) when the activations of the largest micro-batch of ``dataset`` would take more than
        half the memory available (:func:`alignlab.train.checkpointing.resolve_auto`). Returns whether it is on."""
        from alignlab.train.checkpointing import resolve_auto

        return resolve_auto(self, model, dataset, collate_fn, online=online)

    def frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as a frozen model (a reference or reward model): on the device, in eval mode, without
        gradients, and sharded with FSDP2 when the trained model is (:func:`alignlab.train.distributed.shard_frozen`).
        Returns the same module."""
        model = model.to(self.device).eval().requires_grad_(False)
        if self.accelerator is None:
            return model
        return distributed.shard_frozen(self.accelerator, model)

    def is_sharded(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (or a module inside it) is sharded with FSDP2."""
        return distributed.is_sharded(model)

    @contextlib.contextmanager
    def sampling(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model to sample from for the length of the block: ``policy`` itself, all-gathered once when it is
        sharded with FSDP2 and resharded after (:func:`alignlab.train.distributed.gathered_parameters`), so that
        decoding runs on full weights as in one process or DDP. Every process must enter the block."""
        with distributed.gathered_parameters(policy) as model:
            yield model

    # -- the training loop's part --------------------------------------------------------------------------
    def training(self) -> contextlib.AbstractContextManager:
        """The CPU speed layer for one training run (:func:`alignlab.ops.cpu_kernels.training` with the
        config's ``cpu_kernels``): entered by the loop around the run."""
        return cpu_kernels.training(self.config.cpu_kernels)

    def prepare(self, model: torch.nn.Module, optimizer, loader):
        """accelerate's ``prepare`` of the trained model, its optimizer and data loader; under FSDP2 the wrap
        units are named first (:func:`~alignlab.train.distributed.set_wrap_classes`) and the root settled after
        (:func:`~alignlab.train.distributed.initialize`). Returns the three prepared."""
        acc = self.accelerator
        if distributed.is_fsdp(acc):
            distributed.set_wrap_classes(acc, model)
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
        if distributed.is_fsdp(acc):
            distributed.initialize(model)
        return model, optimizer, loader

    def full_state_dict(self, model: torch.nn.Module, part: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full weights of ``part`` (``model`` or a submodule of it; ``model`` unwrapped) when ``model`` is
        sharded (gathered on the main process, an empty dict on the others; every process must call it), else
        ``None`` (the model holds its weights itself)."""
        if not distributed.is_sharded(model):
            return None
        return distributed.sub_state_dict(distributed.full_state_dict(model), model, part)

    def after_backward(self) -> None:
        """After the last backward of an optimizer update, before the step
        (:func:`alignlab.ops.cpu_kernels.after_backward`)."""
        cpu_kernels.after_backward(self.device)

    def after_optimizer_step(self) -> None:
        """At the end of an optimizer step (:func:`alignlab.ops.cpu_kernels.after_optimizer_step`)."""
        cpu_kernels.after_optimizer_step(self.device)


def build_runtime(config) -> Runtime:
    """The runtime of a training run of ``config``: an ``accelerate.Accelerator`` (devices, processes, seeded data
    order; ``torchrun --nproc_per_node N`` runs DDP, gloo on CPU), the seed set, and the CPU speed layer's process
    setting applied (``config.cpu_kernels``). Call it before loading models, so every process knows its device
    and the models' memory is allocated under that setting. Gradient accumulation is the loop's
    (:func:`~alignlab.train.steps.run_update`), not accelerate's; so is precision (:meth:`Runtime.precision`).

    With ``--fsdp`` (or an ``accelerate launch`` FSDP config) the trained model is sharded with FSDP2
    (:mod:`alignlab.train.distributed`), on accelerators and on CPU processes alike.

    Raises:
        UserError: bad ``--fsdp`` / ``--fsdp_config`` / ``--report_to`` values.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from alignlab.train.tracking import accelerator_tracking_kwargs

    # accelerate keeps one global state per process; a second run in the same Python process (a notebook,
    # a comparison of methods) may want another precision, so start it afresh. The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # With no accelerator, say so: accelerate only sets up multi-process CPU training (gloo) when cpu=True.
    if hasattr(torch, "accelerator"):
        no_accelerator = torch.accelerator.current_accelerator() is None
    else:  # torch < 2.6
        no_accelerator = not torch.cuda.is_available()
    fsdp_plugin = distributed.build_fsdp_plugin(config.fsdp, config.fsdp_config)
    from alignlab.train.trl_args import accelerator_options

    accelerator = Accelerator(
        cpu=no_accelerator or bool(getattr(config, "use_cpu", False)),
        **accelerator_options(config),
        mixed_precision="no",
        fsdp_plugin=fsdp_plugin,
        **accelerator_tracking_kwargs(config.report_to, config.output_dir),
    )
    distributed.enable_on_cpu(accelerator, fsdp_plugin)
    distributed.keep_loading_whole()
    set_seed(config.seed)
    if getattr(config, "full_determinism", False):
        from transformers import enable_full_determinism

        enable_full_determinism(config.seed)
    cpu_kernels.configure(config.cpu_kernels)
    return Runtime(config, accelerator)


__all__ = ["Runtime", "build_runtime", "disable_dropout"]
