"""The method registry: one entry per training method, declared in its algorithm module and read by the
command line (:mod:`alignlab.cli`), ``compare``, ``evaluate`` and the report.

An algorithm module ends with one :func:`register_method` call naming its command, config dataclass and train
function, whether it samples online, the metric its training curve shows, and how ``compare`` builds its run
from the shared budget (:class:`CompareBudget`). Nothing else lists methods: the modules of
:mod:`alignlab.algorithms` are imported (and so registered) on the first look-up, so a new algorithm module is
a new command and a new ``compare --methods`` entry. ``docs/developing.md`` shows the steps.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignlab.registry import Registry


@dataclass(frozen=True)
class CompareBudget:
    """What ``compare`` gives every method alike: the base model, the data, the step budget and sampling.

    Attributes:
        prompts: the training prompts file (``train.jsonl``), for online methods.
        pairs: the offline preference pairs file the run trains on (``pairs.jsonl``, or its seed's
            ``pairs/seed-<seed>.jsonl``), sampled from the base model.
        max_steps: optimizer steps per method; prompts_per_step: prompts (or pairs) per step.
        max_new_tokens: completion budget in tokens; temperature: sampling temperature.
        num_generations: completions per prompt for group methods (GRPO); num_ppo_epochs: PPO epochs.
        samples_per_prompt: completions sampled per prompt to build pairs (iterative DPO's rounds too).
        reward_funcs, reward_weights: the task's reward, as ``--reward_funcs`` / ``--reward_weights``.
        stage_model: the model directory another stage wrote (e.g. ``stage_model("reward-model")``).
    """

    prompts: str
    pairs: str
    max_steps: int
    prompts_per_step: int
    max_new_tokens: int
    temperature: float
    num_generations: int
    num_ppo_epochs: int
    samples_per_prompt: int
    reward_funcs: list[str] | None
    reward_weights: list[float] | None
    stage_model: Callable[[str], str]

    @property
    def rule(self) -> dict[str, Any]:
        """The task's reward as flags of an online method."""
        return {"reward_funcs": self.reward_funcs, "reward_weights": self.reward_weights}


@dataclass(frozen=True)
class CompareEntry:
    """One way ``compare`` runs a method (a command can have several, e.g. PPO with a reward model or rules).

    Attributes:
        name: the ``compare --methods`` name.
        args: the method's own flags from the shared budget (compare adds the model, output folder, seed,
            precision, ``max_steps`` and learning rate; a returned key overrides them).
        learning_rate: the default learning rate when neither the preset nor the user sets one.
        curve_label: what the training-curve panel's metric means for this entry.
        requires: stages run first (their model folders are reachable through ``budget.stage_model``).
        stage_only: a stage other entries require (a reward model), not a method of the comparison.
        min_steps: the smallest ``compare --max_steps`` the entry can split its budget over (e.g. one step per
            round of a multi-round method).
    """

    name: str
    args: Callable[[CompareBudget], dict[str, Any]]
    learning_rate: float
    curve_label: str
    requires: tuple[str, ...] = ()
    stage_only: bool = False
    min_steps: int = 1


@dataclass(frozen=True)
class Method:
    """A training command and everything the rest of alignlab needs to know about it.

    Attributes:
        command: the ``alignlab`` command (``dpo``, ``grpo``, ...).
        summary: one line for ``alignlab --help``.
        config: the config dataclass (its fields are the command's flags).
        train: ``train(config) -> TrainResult`` (or, for multi-round pipelines, their records).
        online: samples from the policy while training (needs a reward) or trains on fixed data.
        curve_metric: the ``metrics.jsonl`` name the report plots for it (``None``: no curve).
        final_metrics: training metrics the command prints at the end.
        eval_metric: the evaluation metric it prints (offline methods with an eval set).
        compare: the ways ``compare`` can run it (empty: not offered by ``compare``).
        print_result: ``print_result(config, result)`` prints what ``train`` returned (default: the output
            paths and the metrics above).
        checkpoints_in_runs: the command's checkpoints are its inner runs' (see the field).
    """

    command: str
    summary: str
    config: type
    train: Callable[[Any], Any]
    online: bool
    curve_metric: str | None = None
    final_metrics: tuple[str, ...] = ()
    eval_metric: str | None = None
    compare: tuple[CompareEntry, ...] = ()
    print_result: Callable[[Any, Any], None] | None = None
    checkpoints_in_runs: bool = False
    """The command's checkpoints are written by the training runs it starts (iterative-dpo's rounds, each in
    its own folder), so ``--resume_from_checkpoint`` is resolved by those runs, not against ``output_dir``."""


_METHODS: Registry[Method] = Registry("command", error=KeyError,
                                      same=lambda old, new: old.train is new.train)
_loaded = False


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (called at the end of its algorithm module); returns it.

    Raises:
        ValueError: a command or a compare name already registered by another method.
    """
    names = {e.name for name, m in _METHODS.items() if name != method.command for e in m.compare}
    clash = names & {e.name for e in method.compare}
    if clash:
        raise ValueError(f"compare name(s) {sorted(clash)} registered twice")
    return _METHODS.add(method.command, method)


def methods() -> dict[str, Method]:
    """Every registered method by command, in registration order (importing :mod:`alignlab.algorithms`'s
    modules the first time)."""
    global _loaded
    if not _loaded:
        import alignlab.algorithms as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _loaded = True
    return dict(_METHODS)


def get_method(command: str) -> Method:
    """The method of ``command``. Raises ``KeyError`` for an unknown one (its message lists the commands)."""
    methods()
    return _METHODS.get(command)


def compare_entries(*, include_stages: bool = False) -> dict[str, tuple[Method, CompareEntry]]:
    """``compare --methods`` name -> ``(method, entry)``, stages other entries require included on request."""
    return {e.name: (m, e) for m in methods().values() for e in m.compare if include_stages or not e.stage_only}


def curve_metrics() -> dict[str, tuple[str, str]]:
    """``compare`` name -> ``(metric, label)`` of its training curve."""
    return {name: (m.curve_metric, e.curve_label) for name, (m, e) in compare_entries().items() if m.curve_metric}


def method_groups() -> dict[str, list[str]]:
    """``compare --methods`` group names: ``all``, ``all-online``, ``all-offline``."""
    entries = compare_entries()
    return {
        "all": list(entries),
        "all-online": [n for n, (m, _) in entries.items() if m.online],
        "all-offline": [n for n, (m, _) in entries.items() if not m.online],
    }


__all__ = ["CompareBudget", "CompareEntry", "Method", "register_method", "methods", "get_method",
           "compare_entries", "curve_metrics", "method_groups"]
