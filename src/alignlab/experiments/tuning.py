"""Per-method tuning for ``alignlab compare --tune``: each method's learning rate (and KL coefficient) chosen on a
validation split of the *training* prompts, never on the held-out ones.

A comparison is only fair if every method gets its best shot at the same budget: methods differ in the learning
rate and KL weight they need (Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?", arXiv 2404.10719, §5;
Ivison et al. 2024, "Unpacking DPO and PPO", arXiv 2406.09279, tune both per method). ``compare --tune`` does it
inside the run:

1. The training prompts are split once (seeded) into a tuning-train part and a validation part
   (``--tune_validation_size``, default a quarter). The offline pairs are filtered to the tuning-train prompts.
2. For each method, a coordinate search over a small multiplicative grid (``--tune_factors``, default
   ``0.5 1 2``) around the method's starting value: first the learning rate (at the starting KL coefficient),
   then, with ``beta`` in ``--tune``, the KL coefficient at the best learning rate. Each trial trains for
   ``--tune_steps`` steps (a proxy budget, default half of ``--max_steps``) on the tuning-train part.
3. Each trial's policy is evaluated on the validation prompts (mean task reward over
   ``--eval_samples_per_prompt`` samples per prompt); the best one wins, ties going to the earlier trial (the
   starting value first). The final run then trains on all training prompts with the chosen values.

The KL coefficient of a method is whichever of :data:`KL_FLAGS` its config has (DPO's and GRPO's ``beta``, PPO's
``kl_coef``, REINFORCE++'s ``init_kl_coef``); one whose starting value is 0 (GRPO's default: no KL term, no
reference model) is left at 0.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from alignlab.errors import UserError

TUNABLE = {"learning_rate": "learning_rate", "lr": "learning_rate", "beta": "beta", "kl": "beta"}
"""``--tune`` names -> what is tuned (``beta`` stands for each method's KL coefficient)."""

KL_FLAGS = ("beta", "kl_coef", "init_kl_coef")
"""Config fields that weigh a method's KL (or implicit-KL) term, in the order they are looked for."""


def parse_tune(names: list[str] | None) -> list[str]:
    """``--tune`` values (``lr,beta``, ``learning_rate beta``) -> canonical names in the order
    ``learning_rate``, ``beta``.

    Raises:
        UserError: an unknown name.
    """
    wanted = set()
    for item in names or []:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in TUNABLE:
                raise UserError(f"--tune: unknown hyperparameter {name!r}; choose from learning_rate (lr), beta (kl)")
            wanted.add(TUNABLE[name])
    return [n for n in ("learning_rate", "beta") if n in wanted]


def kl_flag(config_cls: type) -> str | None:
    """The KL-coefficient field of a method's config (:data:`KL_FLAGS`), or ``None`` if it has none."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return next((name for name in KL_FLAGS if name in fields), None)


def default_value(config_cls: type, name: str) -> Any:
    """The declared default of field ``name`` of a config dataclass."""
    found = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    return found.default


def validation_split(rows: list, fraction: float, seed: int, min_train: int) -> tuple[list, list]:
    """Split the training prompts into ``(tuning_train, validation)``: a seeded shuffle, ``ceil``-free
    ``round(fraction * n)`` rows (at least 1) for validation, the rest (at least ``min_train``) for training.

    Raises:
        UserError: too few prompts for both parts.
    """
    n = len(rows)
    k = max(1, round(fraction * n))
    if n - k < min_train:
        raise UserError(f"--tune: {n} training prompts leave {n - k} for tuning runs after {k} validation prompts; "
                        f"a step takes {min_train}: give more --num_train_prompts or a smaller --tune_validation_size")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclass
class Trial:
    """One tuning run: its values and what the validation prompts said of it."""

    values: dict[str, float]
    run: str
    validation_reward: float | None = None
    validation_kl: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "run": self.run, "validation_reward": self.validation_reward,
                "validation_kl": self.validation_kl, **({"error": self.error} if self.error else {})}


@dataclass
class MethodTuning:
    """The tuning of one method: the trials in order and the values chosen."""

    flag: str | None
    start: dict[str, float]
    trials: list[Trial] = field(default_factory=list)

    def best(self, among: list[Trial] | None = None) -> Trial | None:
        """The trial with the highest validation reward (the earliest on ties), ``None`` if none finished."""
        done = [t for t in (among if among is not None else self.trials) if t.validation_reward is not None]
        return max(done, key=lambda t: t.validation_reward) if done else None

    @property
    def chosen(self) -> dict[str, float]:
        best = self.best()
        return dict(best.values) if best else dict(self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"kl_flag": self.flag, "start": self.start, "chosen": self.chosen,
                "trials": [t.to_dict() for t in self.trials]}


def grid(start: float, factors: list[float]) -> list[float]:
    """``start`` times each factor, the factor 1 first (so ties keep the starting value), duplicates dropped."""
    ordered = sorted(factors, key=lambda f: (f != 1.0, factors.index(f)))
    out: list[float] = []
    for f in ordered:
        value = float(f"{start * f:.6g}")
        if value not in out:
            out.append(value)
    return out


GROUP_SAMPLING_METHODS = ("grpo", "rloo", "reinforce-pp", "remax", "online-dpo", "ppo", "ppo-rule")
"""The compare methods that sample ``--num_generations`` completions per prompt (PPO's each scored against its
value model, the others' against their group)."""


def fairness(budget: dict[str, Any], tuning: dict[str, dict[str, Any]] | None, tune_info: dict[str, Any] | None,
             methods: list[str], preset_source: str | None = None) -> dict[str, Any]:
    """What ``compare`` held equal between the methods and what it tuned per method, for ``results.json`` and
    the report: ``{"equalised": [...], "differs": [...], "tuned": [...], "sentence": str}``. ``preset_source``:
    where the preset's per-method learning rates and KL coefficients come from (an offline ``--tune`` sweep),
    when this run uses them."""
    steps = budget["max_steps"]
    equal = ["base model", f"{budget['train_prompts']} training prompts and the task's reward",
             f"{steps} optimizer steps of {budget['prompts_per_step']} prompts (pairs for the offline methods)"
             if not isinstance(steps, dict) else f"the --budget {budget['budget']} (steps per method differ)",
             f"a completion budget of {budget['max_new_tokens']} tokens at temperature {budget['temperature']}",
             f"seed(s) {', '.join(str(s) for s in budget['seeds'])}",
             f"{budget['eval_prompts']} held-out prompts, {budget['eval_samples_per_prompt']} sampled completion(s) each"
             + (f" ({budget['base_eval_samples_per_prompt']} for the base model)"
                if budget.get("base_eval_samples_per_prompt", budget["eval_samples_per_prompt"])
                != budget["eval_samples_per_prompt"] else "")]
    group = [m for m in methods if m in GROUP_SAMPLING_METHODS]
    if group and budget.get("grpo_num_generations"):
        notes = (["Online DPO trains on the best and the worst of them"] if "online-dpo" in group else []) + (
            ["PPO scores each against its value model"] if any(m.startswith("ppo") for m in group) else [])
        equal.append(f"{budget['grpo_num_generations']} sampled completions per prompt for {', '.join(group)}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    differs = ["sampled tokens and training tokens per step (each method's num_tokens), hence FLOPs and wall time",
               "what each step trains on: offline pairs sampled once from the base model (DPO family) or the "
               "policy's own samples (online methods)"]
    if tuning:
        tuned = [f"{m}: " + ", ".join(f"{k} {v:g}" for k, v in t["chosen"].items()) for m, t in tuning.items()]
        info = tune_info or {}
        sentence = (f"Tuned per method on a validation split of the training prompts ({info.get('validation_prompts')} "
                    f"of them, never the held-out prompts), {info.get('steps')}-step trials on the other "
                    f"{info.get('train_prompts')}: " + "; ".join(tuned) + ".")
    else:
        lrs, kls = budget.get("learning_rate", {}), budget.get("kl_coefficient", {})

        def values(m: str) -> str:
            return f"learning rate {lrs[m]:g}" + (f", KL coefficient {kls[m]:g}" if m in kls else "")

        tuned = [f"{m}: {values(m)} (preset or flag, not tuned in this run)" for m in methods if m in lrs]
        if preset_source:
            sentence = ("Nothing was tuned in this run; it uses the preset's per-method values (" + "; ".join(
                f"{m}: {values(m)}" for m in methods if m in lrs) + f"), {preset_source}.")
        else:
            sentence = ("Nothing was tuned in this run; learning rates: " + ", ".join(
                f"{m} {lrs[m]:g}" for m in methods if m in lrs) + " (the preset's, --learning_rate or each method's "
                "default; --tune chooses them per method on a validation split of the training prompts).")
    return {"equalised": equal, "differs": differs, "tuned": tuned, "sentence": sentence}
