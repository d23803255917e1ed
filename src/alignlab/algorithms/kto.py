"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306):
glue between unpaired data (:mod:`alignlab.data.unpaired`), :mod:`alignlab.losses.kto` and the shared loop.

Flow of a micro-batch (TRL 1.16 ``KTOTrainer``): rows ``(x_i, y_i, label_i)`` and the mismatched pairs
``(x_i, y_{i-1})`` of the same batch -> the policy's summed completion log-probs of both (the mismatched ones
without gradient) and the reference's -> ``z0 = max(0, mean over processes of mean(log pi - log pi_ref) of the
mismatched pairs)`` -> ``v = beta (log pi(y|x) - log pi_ref(y|x) - z0)`` -> ``desirable_weight (1 - sigmoid(v))``
or ``undesirable_weight (1 - sigmoid(-v))`` -> mean over the micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignlab.algorithms.base import Algorithm, reference_model
from alignlab.data.unpaired import build_unpaired_examples, collate_unpaired, fix_mismatched_completions
from alignlab.errors import UserError
from alignlab.losses.dpo import token_statistics_metrics
from alignlab.losses.kto import kto_loss
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.models import load_causal_lm
from alignlab.train.trl_args import KTOTrlFields, ReferenceModelFields, model_init_kwargs
from alignlab.ops.logprobs import completion_logps
from alignlab.train.config import TrainConfig
from alignlab.train.setup import load_train_eval
from alignlab.train.steps import LossTerms
from alignlab.train.types import TrainResult

logger = logging.getLogger(__name__)

KTO_PLOTS = {
    "rewards": ["rewards/chosen", "rewards/rejected"],
    "rewards_margins": ["rewards/margins"],
    "logps": ["logps/chosen", "logps/rejected"],
    "kl": ["kl"],
}

SUBSET_METRICS = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")
""":func:`~alignlab.losses.kto.kto_loss`'s metrics over the desirable or the undesirable examples only."""
TOKEN_SUBSET_METRICS = ("logits/chosen", "logits/rejected")
"""TRL's mean logits over the completion tokens of the desirable or the undesirable examples only."""


def subset_means(metrics: dict[str, torch.Tensor], gather: Callable[[torch.Tensor], torch.Tensor],
                 names: tuple[str, ...] = SUBSET_METRICS) -> dict[str, torch.Tensor]:
    """The subset metrics ``names`` of one micro-batch as TRL 1.16 logs them: each the sum over every process's
    values of that subset divided by their number (``rewards/chosen = gathered sum / gathered count``; per
    example, or per token for :data:`TOKEN_SUBSET_METRICS`), and ``rewards/margins`` the difference of the two
    reward means, each present only when its subsets have a value on some process.

    Every process gets the same 0-d values, so the loop's window (which gathers per-example tensors of one size
    across processes) averages them over the micro-batches of a logging window, as TRL's ``log`` does.

    Args:
        metrics: ``{name: (n,)}`` values of the subsets present on this process (absent or empty: none).
        gather: ``(k,) tensor -> (k * processes,)`` (accelerate's gather, the identity on one process).
        names: the subsets, in the order every process gathers them.
    """
    local = torch.tensor([[float(metrics[name].sum()), float(metrics[name].numel())] if name in metrics else [0.0, 0.0]
                          for name in names])
    totals = gather(local.reshape(-1)).reshape(-1, len(names), 2).sum(0)
    out = {name: totals[i, 0] / totals[i, 1] for i, name in enumerate(names) if totals[i, 1] > 0}
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@dataclass
class KTOConfig(KTOTrlFields, ReferenceModelFields, TrainConfig):
    """Settings of ``alignlab kto``; names and defaults follow TRL 1.16's ``KTOConfig`` (``loss_type="kto"``)."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's KTO default)."""
    train_sampling_strategy: str = "sequential"
    """Training rows in data-set order (TRL's KTO default; random: shuffled each epoch)."""
    beta: float = 0.1
    """Strength of the pull toward the reference model (the paper's beta)."""
    desirable_weight: float = 1.0
    """Weight of the desirable examples' losses (the paper's lambda_D)."""
    undesirable_weight: float = 1.0
    """Weight of the undesirable examples' losses (lambda_U). With unequal counts the paper (eq. 8) suggests
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]; a warning says when the weights are outside it."""
    max_length: int | None = 1024
    """Cap on prompt+completion tokens (the end is cut); rows whose prompt alone fills it are dropped."""
    padding_free: bool = True
    """Pack sequences without padding for every forward (as ``alignlab dpo``; same numbers as padded rows)."""
    prompt_column: str = "prompt"
    """Column holding the prompt."""
    completion_column: str = "completion"
    """Column holding the completion (unpaired data)."""
    label_column: str = "label"
    """Column holding true (desirable) or false (undesirable) (unpaired data)."""
    chosen_column: str = "chosen"
    """With preference pairs: the preferred completion (becomes a desirable row)."""
    rejected_column: str = "rejected"
    """With preference pairs: the dispreferred completion (becomes an undesirable row)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise UserError("--desirable_weight and --undesirable_weight must be >= 0")
        if self.per_device_train_batch_size < 2:
            raise UserError("--per_device_train_batch_size must be >= 2: KTO's KL estimate pairs each prompt with "
                            "another example's completion of the same batch")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")

    @property
    def columns(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in
                ("prompt_column", "completion_column", "label_column", "chosen_column", "rejected_column")}


def check_class_weights(n_desirable: int, n_undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """TRL's advice (from the paper's eq. 8) when the two classes differ in size: a message suggesting weight
    ranges when neither weight is in its range, else ``None``."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_d == n_u:
        return None
    d_low, d_high = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_low, u_high = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable examples: use --desirable_weight in "
            f"[{d_low}, {d_high}] or --undesirable_weight in [{u_low}, {u_high}] (not both)")


class KTOTrainer(Algorithm):
    """KTO of a causal LM on unpaired desirable / undesirable completions (or preference pairs split into them).

    The reference model is a frozen copy of the initial policy, or with ``use_peft`` the policy with its
    adapters disabled.

    Raises:
        UserError / DataError: bad flags, unreadable data, a bad row (named by file and line or row).
    """

    trl_positional = ("model", "ref_model", "args", "data_collator", "train_dataset", "eval_dataset",
                      "processing_class", "compute_metrics", "callbacks", "optimizers", "quantization_config",
                      "peft_config")
    """TRL's positional argument order for this trainer."""

    plot_panels = KTO_PLOTS

    def __init__(self, config: KTOConfig):
        super().__init__(config)
        self.train_examples, self.eval_examples = load_train_eval(
            config, build_unpaired_examples, self.tokenizer, is_main_process=self.accelerator.is_main_process,
            max_length=config.max_length, **config.columns)
        labels = [e["label"] for e in self.train_examples]
        advice = check_class_weights(sum(labels), len(labels) - sum(labels), config.desirable_weight,
                                     config.undesirable_weight)
        if advice and self.accelerator.is_main_process:
            logger.warning("%s", advice)
        policy = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                                use_kernels=config.use_kernels, init_kwargs=model_init_kwargs(config))
        self.ref_model = reference_model(config, policy, self.runtime)
        self.policy = self.runtime.prepare_model(policy)
        if config.precompute_ref_log_probs:
            self.policy.eval()
            for examples in (self.train_examples, self.eval_examples):
                self._precompute_ref_logps(examples)
            self.policy.train()
            self.ref_model = None  # freed: the log-probs travel with the examples

    def _precompute_ref_logps(self, examples: list[dict]) -> None:
        """TRL's ``precompute_ref_log_probs``: fix each example's mismatched completion (blocks of
        ``per_device_train_batch_size`` rows, :func:`~alignlab.data.unpaired.fix_mismatched_completions`) and
        store the reference's ``ref_logps`` and ``ref_KL_logps`` on it, in batches of
        ``precompute_ref_batch_size`` (unset: ``per_device_eval_batch_size``)."""
        cfg = self.config
        fix_mismatched_completions(examples, cfg.per_device_train_batch_size)
        size = cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size
        device = self.runtime.device
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = {k: v.to(device) for k, v in collate_unpaired(chunk, self.tokenizer.pad_token_id,
                                                                  max_length=cfg.max_length).items()}
            order = sorted(chunk, key=lambda e: e["index"])  # the collated rows' order
            with torch.no_grad(), self.runtime.precision(), self._reference(self.policy) as reference:
                ref = self._sequence_logps(reference, batch).float().cpu().tolist()
                ref_kl = self._sequence_logps(reference, batch, "KL_").float().cpu().tolist()
            for example, r, k in zip(order, ref, ref_kl):
                example["ref_logps"], example["ref_KL_logps"] = r, k

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.runtime.gather(value)

    def _sequence_logps(self, model, batch: dict[str, torch.Tensor], prefix: str = "",
                        token_stats: tuple[str, ...] = ()):
        """``(B,)`` summed completion log-probs of the ``prefix`` rows (``""`` matched, ``"KL_"`` mismatched); with
        ``token_stats`` also their per-token statistics (:func:`~alignlab.ops.logprobs.completion_logps`)."""
        out = completion_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                               batch[f"{prefix}completion_mask"], padding_free=self.config.padding_free,
                               pad_token_id=self.tokenizer.pad_token_id, token_stats=token_stats)
        return (out[1], out[2]) if token_stats else out[1]

    @contextlib.contextmanager
    def _reference(self, model):
        """The reference network: the frozen copy, or the unwrapped policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.runtime.unwrap(model)
        with policy.disable_adapter():
            yield policy

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """KTO loss and TRL's metrics on a collated batch (:func:`~alignlab.data.unpaired.collate_unpaired`).

        Metrics: ``kl`` (the reference point ``z0``), ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``,
        ``logps/rejected`` and ``rewards/margins`` reduced over processes per micro-batch (:func:`subset_means`);
        TRL's ``entropy``, ``logits/chosen`` and ``logits/rejected`` from the same forward
        (:func:`~alignlab.losses.dpo.token_statistics_metrics`).
        """
        cfg = self.config
        logps, stats = self._sequence_logps(model, batch, token_stats=("entropy", "mean_logits"))
        tokens = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
        desirable = batch["label"].bool()
        entropy = token_statistics_metrics(stats["entropy"], stats["mean_logits"], tokens, desirable)["entropy"]
        values, picked = stats["mean_logits"].detach().float(), desirable.to(tokens.device)[:, None]
        # reduced over processes with the reward metrics: a process's micro-batch may hold one kind only
        token_subsets = {"logits/chosen": values[tokens & picked], "logits/rejected": values[tokens & ~picked]}
        with torch.no_grad():
            precomputed = "ref_logps" in batch  # precompute_ref_log_probs
            if precomputed:
                ref_logps = batch["ref_logps"].to(logps.device, logps.dtype)
            else:
                with self._reference(model) as reference:
                    ref_logps = self._sequence_logps(reference, batch)
            if cfg.loss_type == "apo_zero_unpaired":  # APO-zero, unpaired (TRL): KTO without the reference point
                z0 = torch.zeros(())
            else:
                kl_logps = self._sequence_logps(model, batch, "KL_")
                if precomputed:
                    ref_kl_logps = batch["ref_KL_logps"].to(kl_logps.device, kl_logps.dtype)
                else:
                    with self._reference(model) as reference:
                        ref_kl_logps = self._sequence_logps(reference, batch, "KL_")
                # TRL: the mean log-ratio of the mismatched pairs, averaged over processes, then clamped at 0
                z0 = self._gather((kl_logps - ref_kl_logps).mean().reshape(1).float()).mean().clamp(min=0)
        losses, metrics = kto_loss(logps, ref_logps, batch["label"], z0.to(logps.device), beta=cfg.beta,
                                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        subsets = subset_means({**metrics, **token_subsets}, self._gather, SUBSET_METRICS + TOKEN_SUBSET_METRICS)
        return [(losses.mean(), {"kl": metrics["kl"], **subsets, "entropy": entropy})]

    def loop_inputs(self) -> dict:
        pad, max_length = self.tokenizer.pad_token_id, self.config.max_length
        return {"model": self.policy, "train_dataset": self.train_examples, "eval_dataset": self.eval_examples,
                "collate_fn": lambda examples: collate_unpaired(examples, pad, max_length=max_length)}

def train_kto(config: KTOConfig) -> TrainResult:
    """Run KTO as configured; the Python twin of ``alignlab kto``."""
    return KTOTrainer(config).train()


register_method(Method(
    command="kto", config=KTOConfig, train=train_kto, online=False, curve_metric="rewards/margins",
    summary="KTO: desirable / undesirable completions without pairs (or pairs split into them)",
    eval_metric="eval_rewards/margins", final_metrics=("rewards/margins", "kl"),
    # compare's pairs, split: each step sees prompts_per_step pairs' worth of completions (2 per pair)
    compare=(CompareEntry(name="kto", learning_rate=5e-6, curve_label="KTO implicit reward margin",
                          args=lambda b: {"dataset_name": b.pairs, "per_device_train_batch_size": 2 * b.prompts_per_step}),),
))
