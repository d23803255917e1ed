"""Rewards for sampled completions: Python reward functions named by the user, a reward model, or both,
combined with weights.

Reward functions follow TRL's signature (``GRPOTrainer``'s ``reward_funcs``)::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

``prompts`` and ``completions`` are strings, or message lists for conversational prompts (the completion
is then ``[{"role": "assistant", "content": text}]``); ``kwargs`` holds ``completion_ids`` (token id lists)
and every other column of the prompt rows as a list, one entry per completion. ``None`` means "does not
apply" and counts as 0 in the weighted sum (TRL: NaN, summed with ``nansum``).

A function is loaded only from a place the user names: ``path/to/file.py:name`` (the file is imported) or
``package.module:name`` (imported from the Python path).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab.errors import UserError
from alignlab.rollout.scoring import sequence_scores

RewardFunc = Callable[..., list]


def load_reward_func(spec: str) -> RewardFunc:
    """The callable named by ``spec``: ``path/to/file.py:name`` or ``module:name``.

    Raises:
        UserError: malformed spec, missing file or module, import error in it, no such name, not callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserError(f"--reward_funcs {spec!r}: expected path/to/file.py:function or module:function")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"--reward_funcs {spec!r}: file not found: {path}")
        module_name = f"alignlab_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise UserError(f"--reward_funcs {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise UserError(f"--reward_funcs {spec!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"--reward_funcs {spec!r}: {target} has no {name!r}")
    if not callable(fn):
        raise UserError(f"--reward_funcs {spec!r}: {name!r} is not callable")
    return fn


def call_reward_func(fn: RewardFunc, name: str, prompts: list, completions: list, **kwargs: Any) -> torch.Tensor:
    """``(N,)`` float32 rewards from one reward function, ``NaN`` where it returned ``None``.

    Raises:
        UserError: the function raised, returned something other than a list of N numbers or ``None``, or
            returned a non-finite number.
    """
    try:
        values = fn(prompts, completions, **kwargs)
    except Exception as exc:
        raise UserError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UserError(f"reward function {name!r} must return a list of {len(completions)} numbers, got {got}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise UserError(f"reward function {name!r} returned {v!r} for completion {i}: expected a finite number or None")
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class RewardSource:
    """One weighted source of reward: a Python function or a reward model."""

    name: str
    weight: float
    func: RewardFunc | None = None
    model: torch.nn.Module | None = None


def build_reward_sources(
    reward_funcs: list[str] | None, reward_weights: list[float] | None, *, with_reward_model: bool
) -> list[RewardSource]:
    """Load the reward functions and pair every source with its weight. Cheap: call it before loading models,
    and set the ``model`` of the ``reward_model`` source (last) once it is loaded.

    Order (and the order of ``reward_weights``): the reward functions as given, then the reward model.
    Names (used in metrics as ``rewards/<name>/mean``): each function's ``__name__`` (suffixed ``_2``, ... when
    repeated) and ``reward_model``.

    Raises:
        UserError: no source at all, a weight count that does not match, a bad function spec.
    """
    funcs = [load_reward_func(spec) for spec in reward_funcs or []]
    count = len(funcs) + with_reward_model
    if count == 0:
        raise UserError("give --reward_model_path and/or --reward_funcs: there is nothing to compute rewards with")
    weights = list(reward_weights) if reward_weights else [1.0] * count
    if len(weights) != count:
        raise UserError(
            f"--reward_weights has {len(weights)} values for {count} reward sources "
            "(the reward functions in order, then the reward model)"
        )
    sources, seen = [], {}
    for fn, w in zip(funcs, weights):
        base = getattr(fn, "__name__", "reward_func")
        seen[base] = seen.get(base, 0) + 1
        sources.append(RewardSource(base if seen[base] == 1 else f"{base}_{seen[base]}", w, func=fn))
    if with_reward_model:
        sources.append(RewardSource("reward_model", weights[-1]))
    return sources


def compute_rewards(
    sources: list[RewardSource],
    *,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    reward_inputs: dict[str, torch.Tensor] | None = None,
    padding_free: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every source's rewards for N completions.

    Args:
        sources: from :func:`build_reward_sources`.
        prompts, completions: N of each, strings or message lists (the reward functions' inputs).
        completion_ids: N token-id lists, passed to the functions as ``completion_ids``.
        columns: the prompt rows' other columns, each a list of N values.
        reward_inputs: ``input_ids`` and ``attention_mask`` ``(N, T)`` of prompt+completion as the reward
            model reads them (needed when a source is a model); the score is read at the last real token.
        padding_free: score right-padded ``reward_inputs`` in packed rows, no compute on padding
            (:func:`~alignlab.rollout.scoring.token_scores`).

    Returns:
        ``(total, per_source)``: ``(N,)`` float32 ``sum_k w_k r_k`` with ``None`` counting as 0 (TRL
        ``GRPOTrainer``: ``nansum(rewards_per_func * reward_weights)``), and ``{name: (N,)}`` unweighted, NaN
        where not applicable.

    Raises:
        UserError: a reward function failed or returned bad values.
    """
    per_source: dict[str, torch.Tensor] = {}
    for source in sources:
        if source.func is not None:
            per_source[source.name] = call_reward_func(
                source.func, source.name, prompts, completions, completion_ids=completion_ids, **columns
            )
        else:
            if source.model is None or reward_inputs is None:
                raise ValueError("a reward-model source needs its model and reward_inputs")
            device = next(source.model.parameters()).device
            scores = sequence_scores(
                source.model, reward_inputs["input_ids"].to(device), reward_inputs["attention_mask"].to(device),
                padding_free=padding_free, pad_token_id=source.model.config.pad_token_id or 0,
            )
            per_source[source.name] = scores.detach().float().cpu()
    total = torch.zeros(len(completions))
    for source in sources:
        total = total + torch.nan_to_num(per_source[source.name] * source.weight, nan=0.0)
    return total, per_source
