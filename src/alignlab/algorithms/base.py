"""What every algorithm class shares: one ``train()`` that hands the algorithm's model, data, loss and (online)
rollout to the training loop. An algorithm class says only what differs, in :meth:`Algorithm.loop_inputs`."""

from __future__ import annotations

from typing import Any

from alignlab.models import load_tokenizer
from alignlab.train.trl_args import apply_tokenizer_options
from alignlab.train.loop import Trainer
from alignlab.train.runtime import build_runtime
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms


class Algorithm:
    """Base of the algorithm classes (``DPOTrainer``, ``GRPOTrainer``, ...).

    A subclass has ``config``, ``runtime`` (:class:`~alignlab.train.runtime.Runtime`: device, precision,
    sharding), ``accelerator`` (the runtime's) and ``tokenizer`` (offline ones from ``Algorithm.__init__``), a
    class attribute
    ``plot_panels`` (file stem -> metric names for ``plots/*.png``), and defines :meth:`compute_loss` and
    :meth:`loop_inputs`.
    """

    plot_panels: dict[str, list[str]] = {}

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

    def train(self) -> TrainResult:
        """Train, evaluate when there is an eval set, save; returns where everything went."""
        setup = getattr(self, "setup", None)  # the online algorithms' OnlineSetup holds their reference model
        reference = getattr(self, "ref_model", None) or getattr(setup, "ref_model", None)
        inputs = {"plot_panels": self.plot_panels, "ref_model": reference, **self.loop_inputs()}
        return Trainer(self.config, self.runtime, tokenizer=self.tokenizer, loss_fn=self.compute_loss,
                       **inputs).train()


class OnlineAlgorithm(Algorithm):
    """Base of the online algorithms: the policy samples :attr:`prompts_per_step` prompts per process and step
    from ``self.prompts`` through ``self.rollout``."""

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
