"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290): glue between preference data,
:mod:`alignlab.losses.dpo` and the shared training loop.

Flow: rows -> pairs -> tokenized examples -> batch of [chosen; rejected] -> one policy forward for both ->
sequence logps -> (reference logps) -> DPO loss -> optimizer step -> metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignlab.algorithms.base import Algorithm, reference_model
from alignlab.data.preference import build_pair_examples, collate_pairs
from alignlab.errors import UserError
from alignlab.losses.dpo import (
    F_DIVERGENCE_LOSSES, F_DIVERGENCES, PREFERENCE_LOSSES, PairLogps, combined_reward_kind, get_preference_loss,
    length_desensitized_logps, preference_loss, preference_loss_kwargs, preference_metrics, token_statistics_metrics,
)
from alignlab.methods import CompareBudget, CompareEntry, Method, register_method
from alignlab.models import is_peft_model, load_causal_lm
from alignlab.train.trl_args import PreferenceTrlFields, ReferenceModelFields, model_init_kwargs
from alignlab.ops.logprobs import completion_logps
from alignlab.train.config import TrainConfig
from alignlab.train.setup import load_train_eval
from alignlab.train.steps import LossTerms
from alignlab.train.types import TrainResult


DPO_PLOTS = {
    "rewards_accuracies": ["rewards/accuracies"],
    "rewards_margins": ["rewards/margins"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
    "logps": ["logps/chosen", "logps/rejected"],
}


@dataclass
class Objective:
    """One weighted preference set of multi-objective DPO."""

    path: str
    weight: float | None
    name: str


def parse_objectives(spec) -> list[Objective]:
    """``dataset_name`` as given (a string, or a list of ``"path[:weight]"`` strings or ``{path, weight, name}``
    dicts) -> objectives. A trailing ``:number`` is a weight (``builtin:concise`` has none); names are the file
    stems, made unique.

    Raises:
        UserError: a bad entry, a weight that is not a positive number, or weights on some entries only.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, dict)) else list(spec)
    objectives = []
    for item in items:
        if isinstance(item, dict):
            if "path" not in item:
                raise UserError(f"--dataset_name entry {item!r} has no 'path'")
            path, weight, name = str(item["path"]), item.get("weight"), item.get("name")
        elif isinstance(item, str):
            head, sep, tail = item.rpartition(":")
            try:
                path, weight = (head, float(tail)) if sep and head else (item, None)
            except ValueError:
                path, weight = item, None
            name = None
        else:
            raise UserError(f"--dataset_name entry {item!r} is neither a path nor a {{path, weight}} mapping")
        if weight is not None and not (isinstance(weight, (int, float)) and weight > 0):
            raise UserError(f"--dataset_name {path}: weight must be a positive number, got {weight!r}")
        stem = name or Path(path.split(":")[-1]).name.split(".")[0] or "objective"
        objectives.append(Objective(path, None if weight is None else float(weight), stem))
    if len(objectives) > 1 and any(o.weight is None for o in objectives):
        raise UserError("--dataset_name: give every data set a weight (a.jsonl:0.5 b.jsonl:0.5) or use one data set")
    seen: dict[str, int] = {}
    for o in objectives:
        seen[o.name] = seen.get(o.name, 0) + 1
        if seen[o.name] > 1:
            o.name = f"{o.name}_{seen[o.name]}"
    return objectives


class ObjectiveZip(torch.utils.data.Dataset):
    """Item ``k`` is ``[set_0[k % len_0], set_1[k % len_1], ...]``: every batch holds the same number of pairs
    from each set; an epoch is a pass over the largest set (the others repeat)."""

    def __init__(self, sets: list[list[dict]]):
        self.sets = sets

    def __len__(self) -> int:
        return max(len(s) for s in self.sets)

    def __getitem__(self, k: int) -> list[dict]:
        return [s[k % len(s)] for s in self.sets]


@dataclass
class PreferenceLossConfig:
    """The preference-loss fields of every config that trains with :mod:`alignlab.losses.dpo`'s losses (``dpo``,
    ``online-dpo``, ``iterative-dpo``): which losses, their weights, and the hyperparameters they declare (one field
    per declared name, TRL's name and default). Put it first among the bases
    (``class XConfig(PreferenceLossConfig, TrainConfig)``), so that its fields follow the shared ones."""

    beta: float = 0.1
    """DPO's beta: strength of the implicit KL penalty to the reference model (the paper's beta; IPO's tau)."""
    loss_type: list[str] = dataclasses.field(default_factory=lambda: ["sigmoid"])
    """The preference loss, or several (weighted by ``loss_weights``, as TRL): sigmoid (DPO), hinge, ipo,
    exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
    sigmoid_norm (TRL 1.16's DPO loss types), and the reference-free simpo, cpo and orpo (no reference model
    is loaded when every loss is reference-free). Formulas and sources: docs/losses.md."""
    loss_weights: list[float] | None = None
    """One weight per ``loss_type`` (default: all 1)."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped preference labels in [0, 0.5): conservative DPO with sigmoid, robust DPO with
    robust; EXO's epsilon with exo_pair; label smoothing of simpo and cpo."""
    discopop_tau: float = 0.05
    """Temperature of the discopop loss's mixing (TRL's default)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (TRL ``CPOConfig.simpo_gamma``)."""
    cpo_alpha: float = 1.0
    """Weight of CPO's (and SimPO's, when > 0 with loss_type cpo) NLL term on the chosen completion (TRL
    ``CPOConfig.cpo_alpha``)."""
    alpha: float = 0.0
    """AlphaPO's reward shape for cpo and simpo: each log-prob ``logp`` becomes ``(1 - exp(-alpha logp)) / alpha``
    (TRL ``CPOConfig.alpha``; 0: the log-prob itself)."""

    def _check_loss_types(self) -> None:
        """``loss_type`` as a list of registered names, and ``loss_weights`` of its length.

        Raises:
            UserError: an unknown loss, none, or weights of another length.
        """
        self.loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in self.loss_type if t not in PREFERENCE_LOSSES]
        if unknown or not self.loss_type:
            raise UserError(f"--loss_type: unknown loss {unknown[0] if unknown else None!r}; choose from "
                            f"{', '.join(PREFERENCE_LOSSES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(f"--loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types")

    def _check_loss_hyperparameters(self) -> None:
        """The hyperparameters' ranges, and ``label_smoothing`` only where a selected loss takes it.

        Raises:
            UserError: a value out of range.
        """
        if not self.beta > 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        takes_smoothing = [t for t in self.loss_type if "label_smoothing" in PREFERENCE_LOSSES.fields(t)]
        if self.label_smoothing and not takes_smoothing:
            raise UserError(f"--label_smoothing does not apply to --loss_type {' '.join(self.loss_type)}")
        if "exo_pair" in self.loss_type and not self.label_smoothing > 0:
            raise UserError("--loss_type exo_pair needs --label_smoothing > 0 (its epsilon)")

    @property
    def needs_reference(self) -> bool:
        """Whether any of the losses compares with a reference model."""
        return any(get_preference_loss(t).needs_reference for t in self.loss_type)

    def loss_hyperparameters(self) -> dict[str, float]:
        """The hyperparameters the selected losses declare, read from this config's fields
        (:func:`~alignlab.losses.dpo.preference_loss_kwargs`; each loss takes the ones it declares)."""
        return preference_loss_kwargs(self.loss_type, self)


@dataclass
class DPOConfig(PreferenceLossConfig, PreferenceTrlFields, ReferenceModelFields, TrainConfig):
    """Settings of ``alignlab dpo``; names and defaults follow TRL's ``DPOConfig`` (TRL 1.16)."""

    dataset_name: list[str] | None = None
    """Preference pairs (the forms of every command). Several weighted objectives: ``a.jsonl:0.5
    b.jsonl:0.5`` (or, in a YAML config, a list of such strings or of ``{path, weight, name}``): the loss is
    the weighted sum of each set's DPO loss, every batch holding ``per_device_train_batch_size`` pairs of each
    set, and each set's metrics are logged under its name (the file stem)."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's DPO default)."""
    max_length: int | None = 1024
    """Cap on prompt+completion tokens per sequence; longer pairs are handled by ``truncation_mode``."""
    truncation_mode: Literal["keep_start", "keep_end", "drop"] = "keep_start"
    """keep_start: cut the end (TRL's default); keep_end: cut the start; drop: drop the pair."""
    padding_free: bool = True
    """Pack the chosen and rejected sequences of a batch into as few rows as fit, with restarting position ids,
    so no compute goes to padding (the same numbers as padded rows; TRL's ``padding_free``, off there by
    default). Used for model types whose masks support it (Llama, Mistral, Qwen, Gemma, Phi-3, ...)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs once before training and free the reference model."""
    contrastive_weight: float = 0.0
    """Contrastive DPO: add ``w`` times the mean, over ordered pairs (i, j) of batch pairs with different
    prompts, of a DPO term under prompt i preferring i's chosen answer to j's chosen answer (an answer must
    fit its prompt). 0: off."""
    prompt_column: str = "prompt"
    """Column holding the prompt (explicit-prompt data)."""
    chosen_column: str = "chosen"
    """Column holding the preferred completion (or full transcript)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred completion (or full transcript)."""

    def __post_init__(self) -> None:
        self._check_loss_types()
        self.objectives = parse_objectives(self.dataset_name)
        if len(self.objectives) == 1 and self.objectives[0].weight is None:
            self.dataset_name = self.objectives[0].path  # one plain data set: as every other command
        super().__post_init__()
        self._check_loss_hyperparameters()
        if self.contrastive_weight < 0:
            raise UserError(f"--contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_weight and not self.needs_reference:
            raise UserError("--contrastive_weight compares log-ratios to the reference: use a loss_type that has one")
        if self.contrastive_weight and self.precompute_ref_log_probs:
            raise UserError("--contrastive_weight needs the reference model during training: drop --precompute_ref_log_probs")
        if len(self.objectives) > 1 and self.eval_dataset_name:
            raise UserError("with several weighted data sets use --eval_split_size (held out per set), not --eval_dataset_name")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise UserError(f"--f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got "
                            f"{self.f_divergence_type!r}")
        others = [t for t in self.loss_type if t not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and others:
            raise UserError(f"--f_divergence_type {self.f_divergence_type} does not apply to --loss_type "
                            f"{' '.join(others)} (only {', '.join(F_DIVERGENCE_LOSSES)}, as TRL)")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise UserError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.ld_alpha is not None and self.contrastive_weight:
            raise UserError("--ld_alpha weighs the tokens of a chosen/rejected pair: drop --contrastive_weight")


class DPOTrainer(Algorithm):
    """DPO of a causal LM on preference pairs.

    >>> trainer = DPOTrainer(DPOConfig(dataset_name="builtin:concise", output_dir="runs/dpo", max_steps=10))
    >>> result = trainer.train()   # writes the model, metrics.jsonl, config.yaml and plots/ to output_dir

    The reference model is a frozen copy of the initial policy; with ``use_peft`` it is the same network
    with the adapters disabled (no second copy in memory); with ``precompute_ref_log_probs`` its log-probs
    are computed once before training and the copy is freed.

    Raises:
        UserError / DataError: bad flags, unreadable data, a bad row (named by file and line or row).
    """

    trl_positional = ("model", "ref_model", "args", "data_collator", "train_dataset", "eval_dataset",
                      "processing_class", "compute_metrics", "callbacks", "optimizers", "quantization_config",
                      "peft_config")
    """TRL's positional argument order for this trainer."""

    def __init__(self, config: DPOConfig):
        super().__init__(config)
        runtime = self.runtime
        build_kwargs = dict(
            is_main_process=self.accelerator.is_main_process,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            max_completion_length=config.max_completion_length,
            prompt_column=config.prompt_column,
            chosen_column=config.chosen_column,
            rejected_column=config.rejected_column,
        )
        if len(config.objectives) > 1 or config.objectives[0].weight is not None:
            sets, self.eval_examples = [], []
            for k, objective in enumerate(config.objectives):
                one = dataclasses.replace(config, dataset_name=objective.path)
                train, evals = load_train_eval(one, build_pair_examples, self.tokenizer, **build_kwargs)
                if not train:
                    raise UserError(f"--dataset_name {objective.path}: no training pairs after preprocessing")
                for example in train + evals:
                    example["objective"] = k
                sets.append(train)
                self.eval_examples += evals
            self.train_examples = ObjectiveZip(sets)
        else:
            self.train_examples, self.eval_examples = load_train_eval(
                config, build_pair_examples, self.tokenizer, **build_kwargs
            )
        policy = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                                use_kernels=config.use_kernels, init_kwargs=model_init_kwargs(config))
        self.ref_model = reference_model(config, policy, runtime, needed=config.needs_reference)
        self.policy = runtime.prepare_model(policy)

        if config.precompute_ref_log_probs and config.needs_reference:
            sets = getattr(self.train_examples, "sets", [self.train_examples])
            for examples in [*sets, self.eval_examples]:
                self._precompute_ref_logps(examples)
            self.ref_model = None  # freed: the logps travel with the examples

    # ------------------------------------------------------------------------------------------------------
    def _logps(self, model, batch, token_stats: tuple[str, ...] = ()):
        """``(2B + M,)`` sequence logps of a collated batch under ``model`` (``M`` contrastive rows); with
        ``token_stats`` also their per-token statistics (:func:`~alignlab.ops.logprobs.completion_logps`). With
        ``ld_alpha``, LD-DPO's weighted sums (:func:`~alignlab.losses.dpo.length_desensitized_logps`)."""
        out = completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            padding_free=self.config.padding_free,
            pad_token_id=self.tokenizer.pad_token_id,
            token_stats=token_stats,
        )
        logps = out[1]
        if self.config.ld_alpha is not None:
            tokens = batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]
            logps = length_desensitized_logps(out[0], tokens, self.config.ld_alpha)
        return (logps, out[2]) if token_stats else logps

    def _reference_logps(self, model, batch) -> torch.Tensor:
        """``(2B + M,)`` reference sequence logps for a collated batch, without gradients."""
        with torch.no_grad():
            if self.ref_model is not None:
                return self._logps(self.ref_model, batch)
            unwrapped = self.runtime.unwrap(model)
            if not is_peft_model(unwrapped):
                raise RuntimeError("no reference model and no adapters to disable")
            with unwrapped.disable_adapter():
                return self._logps(unwrapped, batch)

    @property
    def _pad_id(self) -> int:
        """The id padding the batches: ``padding_value`` (TRL ORPO's), else the tokenizer's pad id."""
        value = self.config.padding_value
        return self.tokenizer.pad_token_id if value is None else value

    def _precompute_ref_logps(self, examples: list[dict]) -> None:
        size = self.config.precompute_ref_batch_size or self.config.per_device_eval_batch_size
        device = self.runtime.device
        model = self.ref_model if self.ref_model is not None else self.policy
        model.eval()
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, self._pad_id).items()}
            with self.runtime.precision():
                logps = self._reference_logps(model, batch)
            chosen, rejected = logps.float().cpu().chunk(2)
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                example["ref_chosen_logps"] = c
                example["ref_rejected_logps"] = r
        self.policy.train()

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """DPO loss and metrics on a collated batch (rows ``[chosen; rejected; contrastive]``).

        All rows go through the policy in one forward pass. Metrics (per pair): TRL's ``rewards/*`` and
        ``logps/*``; with several objectives also ``<name>/rewards/*`` and ``<name>/loss`` per objective; with
        ``contrastive_weight`` also ``contrastive/loss`` and ``contrastive/accuracies``. Per micro-batch, from
        the same forward (the chunked output head's running statistics): TRL's ``entropy``, ``logits/chosen`` and
        ``logits/rejected`` (:func:`~alignlab.losses.dpo.token_statistics_metrics`).
        """
        cfg = self.config
        logps, stats = self._logps(model, batch, token_stats=("entropy", "mean_logits"))
        n_cross = batch["contrastive_index"].shape[0] if "contrastive_index" in batch else 0
        n = (logps.shape[0] - n_cross) // 2
        chosen_logps, rejected_logps = logps[:n], logps[n : 2 * n]
        ref = ref_chosen = ref_rejected = None
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif cfg.needs_reference:
            ref = self._reference_logps(model, batch)
            ref_chosen, ref_rejected = ref[:n], ref[n : 2 * n]
        lengths = batch["completion_mask"][:, 1:].sum(dim=1).float()
        pair = PairLogps(chosen_logps, rejected_logps, lengths[:n], lengths[n : 2 * n], ref_chosen, ref_rejected)
        hyper = cfg.loss_hyperparameters()
        scored = dataclasses.replace(pair, f_divergence_type=cfg.f_divergence_type,  # f-DPO: the loss's scores;
                                     f_alpha_divergence_coef=cfg.f_alpha_divergence_coef)  # metrics: log-ratios
        losses = preference_loss(cfg.loss_type, scored, loss_weights=cfg.loss_weights, **hyper)
        metrics = preference_metrics(pair, beta=cfg.beta, reward_kind=combined_reward_kind(cfg.loss_type))
        tokens = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
        metrics.update(token_statistics_metrics(stats["entropy"][: 2 * n], stats["mean_logits"][: 2 * n],
                                                tokens[: 2 * n], torch.arange(2 * n) < n))
        if "objective" in batch:
            loss = losses.new_zeros(())
            for k, objective in enumerate(cfg.objectives):
                selected = batch["objective"] == k
                if not selected.any():
                    continue
                loss = loss + objective.weight * losses[selected].mean()
                metrics[f"{objective.name}/loss"] = losses[selected].detach()
                for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
                    metrics[f"{objective.name}/{key}"] = metrics[key][selected]
        else:
            loss = losses.mean()
        if n_cross:
            i, j = batch["contrastive_index"].unbind(1)
            cross_pair = PairLogps(chosen_logps[i], logps[2 * n :], pair.chosen_lengths[i], lengths[2 * n :],
                                   ref_chosen[i], ref[2 * n :])
            cross = preference_loss(cfg.loss_type, dataclasses.replace(
                cross_pair, f_divergence_type=cfg.f_divergence_type,
                f_alpha_divergence_coef=cfg.f_alpha_divergence_coef), loss_weights=cfg.loss_weights, **hyper)
            loss = loss + cfg.contrastive_weight * cross.mean()
            metrics["contrastive/loss"] = cross.detach()
            wins = cross_pair.chosen_logratios > cross_pair.rejected_logratios
            metrics["contrastive/accuracies"] = wins.float().detach()
        return [(loss, metrics)]

    def loop_inputs(self) -> dict:
        contrastive = self.config.contrastive_weight > 0
        plots = dict(DPO_PLOTS)
        if len(self.config.objectives) > 1:
            names = [o.name for o in self.config.objectives]
            plots["objectives_accuracies"] = [f"{name}/rewards/accuracies" for name in names]
            plots["objectives_margins"] = [f"{name}/rewards/margins" for name in names]
        if contrastive:
            plots["contrastive"] = ["contrastive/loss", "contrastive/accuracies"]
        return {"model": self.policy, "train_dataset": self.train_examples, "eval_dataset": self.eval_examples,
                "collate_fn": lambda ex: collate_pairs(ex, self._pad_id, contrastive=contrastive),
                "plot_panels": plots}

def train_dpo(config: DPOConfig) -> TrainResult:
    """Run DPO as configured; the Python twin of ``alignlab dpo``."""
    return DPOTrainer(config).train()


def _pairs_args(b: CompareBudget) -> dict:
    return {"dataset_name": [b.pairs], "per_device_train_batch_size": b.prompts_per_step}


register_method(Method(
    command="dpo",
    summary="Direct Preference Optimization (and its loss variants) on preference pairs",
    config=DPOConfig,
    train=train_dpo,
    online=False,
    curve_metric="rewards/margins",
    eval_metric="eval_rewards/accuracies",
    compare=(
        CompareEntry(name="dpo", args=lambda b: _pairs_args(b), learning_rate=5e-6,
                     curve_label="DPO implicit reward margin"),
        CompareEntry(name="ipo", args=lambda b: {**_pairs_args(b), "loss_type": ["ipo"]}, learning_rate=5e-6,
                     curve_label="implicit reward margin"),
        CompareEntry(name="simpo", args=lambda b: {**_pairs_args(b), "loss_type": ["simpo"]}, learning_rate=5e-6,
                     curve_label="length-normalised reward margin"),
        CompareEntry(name="cpo", args=lambda b: {**_pairs_args(b), "loss_type": ["cpo"]}, learning_rate=5e-6,
                     curve_label="reward margin"),
        CompareEntry(name="orpo", args=lambda b: {**_pairs_args(b), "loss_type": ["orpo"]}, learning_rate=5e-6,
                     curve_label="log-odds reward margin"),
    ),
))
