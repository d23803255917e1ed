"""What every algorithm class shares: TRL's constructor, and one ``train()`` that hands the algorithm's model,
data, loss and (online) rollout to the training loop. An algorithm class says only what differs, in
:meth:`Algorithm.loop_inputs`.

Every algorithm class takes its config alone (``DPOTrainer(config)``, what the command line does) or TRL's
arguments (``DPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=...,
peft_config=..., callbacks=[...])``): :meth:`Algorithm.__init_subclass__` wraps each class's ``__init__`` so
that the objects given are named in a copy of the config and handed to the loaders while the class builds
itself (:mod:`alignlab.train.inputs`); the algorithm code is the same for both."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any

import torch

from alignlab.errors import UserError
from alignlab.models import load_causal_lm, load_tokenizer
from alignlab.train import inputs as given_inputs
from alignlab.train.callbacks import LoopEvents
from alignlab.train.trl_args import apply_tokenizer_options
from alignlab.train.loop import Trainer
from alignlab.train.runtime import build_runtime
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms

TRL_ARGUMENTS = ("model", "ref_model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "peft_config")
"""TRL's constructor arguments alignlab takes (:func:`alignlab.train.inputs.trainer_inputs`)."""

UNSUPPORTED_ARGUMENTS = ("data_collator", "compute_metrics", "compute_loss_func", "optimizers",
                         "optimizer_cls_and_kwargs", "preprocess_logits_for_metrics", "quantization_config",
                         "formatting_func", "tools", "rollout_func", "environment_factory")
"""TRL's constructor arguments alignlab refuses with a one-line error when given (not ``None``)."""


def reference_model(config, policy: torch.nn.Module, runtime, *, needed: bool = True) -> torch.nn.Module | None:
    """The frozen reference model of a method that has one (TRL's ``ref_model``), prepared by ``runtime``
    (:meth:`~alignlab.train.runtime.Runtime.frozen_model`: evaluation mode, no gradients, sharded under FSDP).

    ``config.ref_model_name_or_path`` when the config has it and it is set; otherwise a frozen copy of
    ``policy`` (before it is prepared for training), or ``None`` with ``use_peft``: the reference is then the
    policy with its adapters disabled, which the method handles itself. ``None`` too when ``needed`` is false
    (a reference-free loss).

    Raises:
        UserError: the named reference cannot be read (as ``--ref_model_name_or_path``).
    """
    if not needed:
        return None
    name = getattr(config, "ref_model_name_or_path", None)
    if name:
        return runtime.frozen_model(load_causal_lm(name, trust_remote_code=config.trust_remote_code,
                                                   use_kernels=config.use_kernels, flag="--ref_model_name_or_path"))
    if config.use_peft:
        return None
    return runtime.frozen_model(copy.deepcopy(policy))


def _config_class(cls: type, init) -> type:
    """The config class ``init``'s first parameter is annotated with (the algorithm's config)."""
    params = list(inspect.signature(init).parameters.values())
    annotation = params[1].annotation if len(params) > 1 else None
    if isinstance(annotation, str):
        annotation = vars(sys.modules[cls.__module__]).get(annotation.split("|")[0].strip())
    return annotation if isinstance(annotation, type) else None


def _bind_trl_arguments(cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    """TRL's positional and keyword arguments of ``cls`` by name (positional ones in ``cls.trl_positional``'s
    order, TRL's for that trainer).

    Raises:
        UserError: too many positional arguments, an unknown keyword, a TRL argument alignlab does not take.
    """
    order = cls.trl_positional
    if len(args) > len(order):
        raise UserError(f"{cls.__name__} takes at most {len(order)} positional arguments ({', '.join(order)}), "
                        f"got {len(args)}")
    bound = dict(zip(order, args))
    for name, value in kwargs.items():
        if name in bound:
            raise UserError(f"{cls.__name__}: {name} given twice")
        bound[name] = value
    for name, value in list(bound.items()):
        if name in UNSUPPORTED_ARGUMENTS:
            if value is not None and value != (None, None):
                raise UserError(f"{cls.__name__}: {name} is not supported by alignlab (it builds its own from the "
                                "config); docs/python.md")
            del bound[name]
        elif name not in TRL_ARGUMENTS:
            raise UserError(f"{cls.__name__}: unknown argument {name!r}; it takes {', '.join(TRL_ARGUMENTS)}")
    return bound


def _trl_constructor(cls: type, init):
    """``init`` (an algorithm's ``__init__(self, config)``) taking TRL's arguments as well (module docstring)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if getattr(self, "_building", False):  # a subclass's __init__ calling its base's
            return init(self, *args, **kwargs)
        if len(args) == 1 and not kwargs and dataclasses.is_dataclass(args[0]) and hasattr(args[0], "output_dir"):
            bound = {"args": args[0]}  # the config alone: the command line's form
        else:
            bound = _bind_trl_arguments(type(self), args, kwargs)
        config_cls = _config_class(cls, init)
        config = bound.pop("args", None)
        model = bound.get("model")
        if config is None:  # TRL's default: output_dir "<model name>-<method>"
            if config_cls is None:
                raise UserError(f"{type(self).__name__}: pass args (its config)")
            name = model if isinstance(model, str) else given_inputs.model_name(model, "model")
            config = config_cls(output_dir=f"{Path(str(name)).name}-{cls.__name__.removesuffix('Trainer')}")
        elif config_cls is not None and not isinstance(config, config_cls):
            raise UserError(f"{type(self).__name__}: args must be a {config_cls.__name__} "
                            f"(from alignlab import {config_cls.__name__}), got "
                            f"{type(config).__module__}.{type(config).__qualname__}")
        callbacks = bound.pop("callbacks", None)
        config, inputs = given_inputs.trainer_inputs(config, **bound)
        config.check_inputs()
        self._building = True
        try:
            with given_inputs.given(inputs):
                init(self, config)
        finally:
            self._building = False
        model = getattr(self, "policy", None)
        model = getattr(self, "model", None) if model is None else model
        self.events = LoopEvents(config, callbacks, model=model, processing_class=self.tokenizer,
                                 is_main_process=self.accelerator.is_main_process)

    __init__._trl_wrapped = True
    return __init__


class Algorithm:
    """Base of the algorithm classes (``DPOTrainer``, ``GRPOTrainer``, ...).

    A subclass has ``config``, ``runtime`` (:class:`~alignlab.train.runtime.Runtime`: device, precision,
    sharding), ``accelerator`` (the runtime's) and ``tokenizer`` (offline ones from ``Algorithm.__init__``), a
    class attribute
    ``plot_panels`` (file stem -> metric names for ``plots/*.png``), and defines :meth:`compute_loss` and
    :meth:`loop_inputs`.
    """

    plot_panels: dict[str, list[str]] = {}
    trl_positional: tuple[str, ...] = ("model", "args", "data_collator", "train_dataset", "eval_dataset",
                                       "processing_class")
    """The order of TRL's positional constructor arguments for this trainer (``SFTTrainer``'s here)."""

    def __init_subclass__(cls, **kwargs):
        """Give the subclass's ``__init__`` TRL's arguments (:func:`_trl_constructor`)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_trl_wrapped", False):
            cls.__init__ = _trl_constructor(cls, init)

    def __init__(self, config):
        """The offline algorithms' start: ``config``, the runtime (before any model is loaded) and the
        tokenizer. Online algorithms get both from :class:`~alignlab.algorithms.online.OnlineSetup` instead."""
        self.config = config
        self.runtime = build_runtime(config)
        self.accelerator = self.runtime.accelerator
        self.tokenizer = apply_tokenizer_options(
            load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code), config)

    def compute_loss(self, model, batch: dict[str, Any]) -> LossTerms:
        """The loss terms of one micro-batch (:data:`alignlab.train.steps.LossFn`)."""
        raise NotImplementedError

    def loop_inputs(self) -> dict[str, Any]:
        """The :class:`~alignlab.train.loop.Trainer` arguments that are the algorithm's own: ``model``,
        ``train_dataset`` and ``collate_fn`` (offline, with ``eval_dataset``), or ``rollout_fn`` and
        ``rollout_batch_size`` (online), ``model_to_save``, and ``plot_panels`` when they depend on the config."""
        raise NotImplementedError

    # -- TRL's trainer API ------------------------------------------------------------------------------------
    @property
    def args(self):
        """The config (TRL's ``trainer.args``)."""
        return self.config

    @property
    def model(self):
        """The model being trained (TRL's ``trainer.model``): the policy (PPO: the policy-and-value module once
        the loop is built), after training the trained one."""
        loop = self.__dict__.get("_loop_trainer")
        if loop is not None:
            return loop.model
        return self.__dict__.get("_model", self.__dict__.get("policy"))

    @model.setter
    def model(self, value) -> None:
        self.__dict__["_model"] = value

    @property
    def processing_class(self):
        """The tokenizer (TRL's ``trainer.processing_class``)."""
        return self.tokenizer

    @property
    def state(self):
        """transformers' ``TrainerState`` of the run: ``global_step``, ``epoch``, ``max_steps``, ``log_history``."""
        return self.events.state

    @property
    def control(self):
        """transformers' ``TrainerControl`` the callbacks set."""
        return self.events.control

    @property
    def callback_handler(self):
        """transformers' ``CallbackHandler`` holding the callbacks."""
        return self.events.handler

    def add_callback(self, callback) -> None:
        """Add a ``TrainerCallback`` (instance or class)."""
        self.events.handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove and return a ``TrainerCallback`` (instance or class)."""
        return self.events.handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        """Remove a ``TrainerCallback`` (instance or class)."""
        self.events.handler.remove_callback(callback)

    def _loop(self) -> Trainer:
        """The training loop of this trainer (built once)."""
        if getattr(self, "_loop_trainer", None) is None:
            setup = getattr(self, "setup", None)  # the online algorithms' OnlineSetup holds their reference model
            reference = getattr(self, "ref_model", None) or getattr(setup, "ref_model", None)
            inputs = {"plot_panels": self.plot_panels, "ref_model": reference, **self.loop_inputs()}
            self._loop_trainer = Trainer(self.config, self.runtime, tokenizer=self.tokenizer,
                                         loss_fn=self.compute_loss, events=self.events, **inputs)
        return self._loop_trainer

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        """Train, evaluate when there is an eval set, save; returns where everything went.

        Args:
            resume_from_checkpoint: ``True`` for the newest checkpoint in ``output_dir``, or a ``checkpoint-N``
                path (TRL's argument; default: the config's ``resume_from_checkpoint``).
        """
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            self.config.resume_from_checkpoint = ("true" if resume_from_checkpoint is True
                                                  else str(resume_from_checkpoint))
        return self._loop().train()

    def evaluate(self) -> dict[str, float]:
        """Evaluate the current model on the eval set: TRL's ``eval_loss`` and the method's ``eval_*`` metrics,
        ``eval_runtime``, ``eval_samples_per_second``, ``eval_steps_per_second`` and ``epoch`` (several eval
        sets: each set's ``eval_NAME_*``, as transformers); logged to
        ``log_history`` (and, after training, to ``metrics.jsonl``); callbacks get ``on_log`` and ``on_evaluate``.

        Raises:
            UserError: there is no eval set (online methods have none).
        """
        loop = self._loop()
        if loop.eval_dataset is None:
            raise UserError("evaluate(): no eval set (give eval_dataset, --eval_dataset_name or --eval_split_size)")
        metrics = loop.evaluate(loop.model, self.state.global_step, record=self.state.global_step > 0)
        for prefix, examples in loop.eval_sets().items():
            seconds = metrics[f"{prefix}_runtime"] or 1e-9
            batches = -(-len(examples) // self.config.per_device_eval_batch_size)
            metrics[f"{prefix}_samples_per_second"] = round(len(examples) / seconds, 3)
            metrics[f"{prefix}_steps_per_second"] = round(batches / seconds, 3)
        metrics["epoch"] = self.state.epoch or 0.0
        self.events.evaluated(metrics)
        return metrics

    def save_model(self, output_dir: str | None = None) -> Path:
        """Save the current model and tokenizer (as training's end does: an adapter with LoRA, merged with
        ``merge_lora``) into ``output_dir`` (default: the config's); returns the folder."""
        out = Path(output_dir or self.config.output_dir)
        if self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        self._loop().save_model(out)
        return out


class OnlineAlgorithm(Algorithm):
    """Base of the online algorithms: the policy samples :attr:`prompts_per_step` prompts per process and step
    from ``self.prompts`` through ``self.rollout``."""

    trl_positional = ("model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                      "reward_processing_classes", "callbacks", "optimizers", "quantization_config", "peft_config")

    def rollout(self, model, examples: list[dict], step: int):
        """Sample, score and build the step's updates (:class:`~alignlab.train.loop.Rollout`)."""
        raise NotImplementedError

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process per step."""
        return self.config.prompts_per_step

    def loop_inputs(self) -> dict[str, Any]:
        return {"model": self.policy, "train_dataset": self.prompts, "collate_fn": list,
                "rollout_fn": self.rollout, "rollout_batch_size": self.prompts_per_step}
