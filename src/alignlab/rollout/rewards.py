"""Rewards for sampled completions: Python reward functions named by the user, a reward model, or both,
combined with weights.

Reward functions follow TRL's signature (``GRPOTrainer``'s ``reward_funcs``)::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

and are called as TRL calls them, by keyword (:func:`reward_call_arguments`; a function whose first two
parameters have other names gets ``prompts`` and ``completions`` positionally).

``prompts`` and ``completions`` are strings, or message lists for conversational prompts (the completion
is then ``[{"role": "assistant", "content": text}]``); ``kwargs`` holds ``completion_ids`` (token id lists)
and every other column of the prompt rows as a list, one entry per completion. ``None`` means "does not
apply" and counts as 0 in the weighted sum (TRL: NaN, summed with ``nansum``).

What a function returns is checked (:func:`validate_rewards`): an exception, a count other than N, a non-list,
NaN, infinities or non-numbers are a one-line :class:`~alignlab.errors.UserError` naming the function by its
spec and the first bad value with its index; or, with ``on_error="drop"``, those completions are marked bad
and their rewards are NaN.

A function is loaded only from a place the user names: ``path/to/file.py:name`` (the file is imported),
``package.module:name`` or ``package.module.name`` (TRL's dotted form; imported from the Python path, the working
directory first), or one of TRL's built-in reward names (:data:`TRL_REWARD_FUNCS`, imported from ``trl.rewards``).

A call that does not return within the reward timeout (``--reward_timeout``, :func:`reward_timeout`; default
:data:`DEFAULT_REWARD_TIMEOUT` seconds) is stopped and is a one-line error naming the function, whatever
``on_error`` says (a function that hangs once would hang every step).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import numbers
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab.errors import UserError
from alignlab.rollout.scoring import sequence_scores

RewardFunc = Callable[..., list]

logger = logging.getLogger(__name__)


TRL_REWARD_FUNCS: dict[str, tuple[str, dict[str, int] | None]] = {
    "accuracy_reward": ("accuracy_reward", None),
    "reasoning_accuracy_reward": ("reasoning_accuracy_reward", None),
    "think_format_reward": ("think_format_reward", None),
    "get_soft_overlong_punishment": ("get_soft_overlong_punishment",
                                     {"max_completion_len": 1280, "soft_punish_cache": 256}),
}
"""The reward names TRL 1.16's ``trl grpo`` / ``trl rloo`` scripts accept in ``--reward_funcs``
(``reward_funcs_registry`` in ``trl/scripts/grpo.py``): name -> (the ``trl.rewards`` attribute, the factory's
arguments or ``None`` for a function used as it is). ``get_soft_overlong_punishment`` is built with the script's
values (``max_completion_len=1280, soft_punish_cache=256``); for others, name ``trl.rewards.<factory>`` results
through a Python file of one's own."""

_SPEC_FORMS = (f"expected path/to/file.py:function, module:function, package.module.function or one of TRL's "
               f"reward names ({', '.join(TRL_REWARD_FUNCS)})")


def _trl_reward_func(spec: str) -> RewardFunc:
    """TRL's built-in reward ``spec`` (a key of :data:`TRL_REWARD_FUNCS`) from ``trl.rewards``."""
    attribute, factory_args = TRL_REWARD_FUNCS[spec]
    try:
        rewards = importlib.import_module("trl.rewards")
        fn = getattr(rewards, attribute)
    except ImportError as exc:
        raise UserError(f"--reward_funcs {spec!r} is TRL's built-in reward: it needs trl installed "
                        f"(pip install trl): {type(exc).__name__}: {exc}") from None
    except AttributeError:
        raise UserError(f"--reward_funcs {spec!r}: the installed trl.rewards has no {attribute!r}") from None
    return fn(**factory_args) if factory_args is not None else fn


def _import_from_cwd(spec: str, target: str):
    """Module ``target``, looked up in the working directory first (as TRL's scripts do), then the Python path."""
    import os

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise UserError(f"--reward_funcs {spec!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_reward_func(spec: str | RewardFunc) -> RewardFunc:
    """The callable named by ``spec``: ``path/to/file.py:name``, ``module:name``, ``package.module.name``
    (TRL's ``trl grpo --reward_funcs`` dotted import path) or a TRL built-in reward name
    (:data:`TRL_REWARD_FUNCS`, from ``trl.rewards``); a function given itself (in Python, as TRL's
    ``reward_funcs``) is returned as it is.

    Raises:
        UserError: malformed spec, missing file or module, import error in it, no such name, not callable; a TRL
            reward name without trl installed.
    """
    if not isinstance(spec, str):
        if callable(spec) and not isinstance(spec, torch.nn.Module):
            return spec
        raise UserError(f"--reward_funcs {_short(spec)}: {_SPEC_FORMS}, or a function")
    if spec in TRL_REWARD_FUNCS:
        return _trl_reward_func(spec)
    target, sep, name = spec.rpartition(":")
    if not sep:  # TRL's dotted form: the last dot separates the module from the name
        target, dot, name = spec.rpartition(".")
        if not dot or not target or not name.isidentifier() or name == "py" \
                or not all(part.isidentifier() for part in target.split(".")):
            raise UserError(f"--reward_funcs {spec!r}: {_SPEC_FORMS}")
        return _checked(spec, target, name, _import_from_cwd(spec, target))
    if not target or not name.isidentifier():
        raise UserError(f"--reward_funcs {spec!r}: {_SPEC_FORMS}")
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
    return _checked(spec, target, name, module)


def _checked(spec: str, target: str, name: str, module) -> RewardFunc:
    """``module.name``, which must exist and be callable."""
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"--reward_funcs {spec!r}: {target} has no {name!r}")
    if not callable(fn):
        raise UserError(f"--reward_funcs {spec!r}: {name!r} is not callable")
    return fn


REWARD_FUNC_ERRORS = ("raise", "drop")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (a 0-d tensor or array counts); ``None`` otherwise.

    ``bool`` is not a number here: a reward function returning ``True``/``False`` most likely forgot to score.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar or 0-d array
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _bad_call(message: str, n: int, on_error: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row bad: raise, or (all NaN, all True) after a warning."""
    if on_error == "raise":
        raise UserError(message)
    logger.warning("%s; dropping all %d completions", message, n)
    return torch.full((n,), math.nan), torch.ones(n, dtype=torch.bool)


def validate_rewards(
    values: Any, n: int, func_name: str, *, on_error: str = "raise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check what a reward function returned for ``n`` completions and turn it into a tensor.

    Good values: a list or tuple (or 1-D tensor or array) of ``n`` entries, each a finite real number or ``None``
    (TRL's "does not apply": NaN here, counted as 0 in the weighted sum as TRL's ``nansum`` does).
    Bad: another type, another length, or an entry that is NaN, infinite, a ``bool`` or not a number.

    Args:
        values: what the function returned.
        n: the number of completions it was given.
        func_name: how messages name the function, e.g. its spec ``my_rewards.py:length``.
        on_error: ``"raise"``: the first problem is a :class:`UserError`. ``"drop"``: bad entries become NaN and
            are marked in the mask (a whole-call problem marks every row); a warning names the first bad value.

    Returns:
        ``(rewards, bad)``: ``(n,)`` float32 with NaN for ``None`` and for dropped entries, and ``(n,)`` bool,
        True where the entry was bad (always all False with ``on_error="raise"``).

    Raises:
        UserError: (``on_error="raise"``) one line naming the function, the first bad value and its index.
        ValueError: ``on_error`` is not ``"raise"`` or ``"drop"``.
    """
    if on_error not in REWARD_FUNC_ERRORS:
        raise ValueError(f"on_error must be one of {REWARD_FUNC_ERRORS}, got {on_error!r}")
    if isinstance(values, torch.Tensor) or (hasattr(values, "tolist") and getattr(values, "ndim", None) == 1):
        values = values.tolist() if values.ndim == 1 else values  # a 0-d or 2-d tensor is reported as bad below
    if not isinstance(values, (list, tuple)):
        return _bad_call(
            f"reward function {func_name} must return a list of {n} numbers, got {type(values).__name__}",
            n, on_error,
        )
    if len(values) != n:
        return _bad_call(f"reward function {func_name} must return a list of {n} numbers, got {len(values)} values",
                         n, on_error)
    out = torch.full((n,), math.nan)
    bad = torch.zeros(n, dtype=torch.bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        number = _as_number(v)
        if number is None or not math.isfinite(number):
            bad[i] = True
        else:
            out[i] = number
    if bad.any():
        first = int(bad.nonzero()[0])
        message = (
            f"reward function {func_name} returned {_short(values[first])} for completion {first} "
            f"({int(bad.sum())} of {n} bad): expected a finite number or None"
        )
        if on_error == "raise":
            raise UserError(message)
        logger.warning("%s; dropping those completions", message)
    return out, bad


DEFAULT_REWARD_TIMEOUT = 300.0
"""Seconds a reward function call may take unless ``--reward_timeout`` says otherwise."""

_timeout = DEFAULT_REWARD_TIMEOUT


@contextlib.contextmanager
def reward_timeout(seconds: float | None) -> Iterator[None]:
    """Within the block, reward function calls time out after ``seconds`` (``None``: the current setting stays).
    The training loop and the command line set it from ``--reward_timeout``."""
    global _timeout
    previous = _timeout
    if seconds is not None:
        _timeout = float(seconds)
    try:
        yield
    finally:
        _timeout = previous


class RewardTimeout(BaseException):
    """Raised inside a reward function whose call ran out of time. A ``BaseException``, so that the function's own
    ``except Exception`` cannot swallow it."""


def _call_with_timeout(fn: Callable, seconds: float, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, stopped by :class:`RewardTimeout` after ``seconds``: a ``SIGALRM`` timer
    (``signal.setitimer``) whose handler raises in the main thread, where Python runs signal handlers. An outer
    ``ITIMER_REAL`` timer and ``SIGALRM`` handler are put back afterwards. Off the main thread, or where there is
    no ``setitimer`` (Windows), the call has no timeout. A function stuck inside C code that does not return to
    Python is only stopped once it does."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn(*args, **kwargs)

    returned = [False]

    def expire(signum, frame):
        if not returned[0]:
            raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        try:
            return fn(*args, **kwargs)
        finally:
            returned[0] = True  # a late alarm from here on does nothing
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def reward_call_arguments(fn: RewardFunc, prompts: list, completions: list,
                          kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, keywords)`` to call reward function ``fn`` with. All by keyword, ``fn(prompts=...,
    completions=..., completion_ids=..., **columns)``, as TRL's ``GRPOTrainer`` calls its reward functions (TRL's
    built-in rewards take no ``prompts`` first: ``think_format_reward(completions, **kwargs)``,
    ``accuracy_reward(completions, solution, **kwargs)``, ``soft_overlong_punishment(completion_ids,
    **kwargs)``), when ``fn`` names a ``completions`` parameter or takes the keywords through ``**kwargs``;
    otherwise ``prompts`` and ``completions`` positionally (``fn(p, c, **kw)``)."""
    import inspect

    keywords = {"prompts": prompts, "completions": completions, **kwargs}
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to inspect: positionally
        return (prompts, completions), kwargs
    named = parameters.get("completions")
    if named is not None and named.kind != inspect.Parameter.POSITIONAL_ONLY:
        return (), keywords
    try:
        inspect.signature(fn).bind(**keywords)
    except TypeError:
        return (prompts, completions), kwargs
    return (), keywords


def run_reward_func(
    fn: RewardFunc, name: str, prompts: list, completions: list, *, on_error: str = "raise", **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call one reward function on N completions and validate the result (:func:`validate_rewards`).

    Args:
        fn: the reward function (TRL signature).
        name: how messages name it (its spec, ``file.py:name``).
        prompts, completions: N of each.
        on_error: ``"raise"`` or ``"drop"``; with ``"drop"`` a function that raises marks every row bad.
        kwargs: ``completion_ids`` and the prompt rows' other columns.

    Returns:
        ``(rewards, bad)``: ``(N,)`` float32 (NaN for ``None`` and dropped rows) and ``(N,)`` bool.

    Raises:
        UserError: (``on_error="raise"``) the function raised, or returned bad values; (always) it did not return
            within the reward timeout (:func:`reward_timeout`).
    """
    n = len(completions)
    try:
        args, keywords = reward_call_arguments(fn, prompts, completions, kwargs)
        values = _call_with_timeout(fn, _timeout, *args, **keywords)
    except RewardTimeout:
        raise UserError(f"reward function {name} did not return within {_timeout:g} s (--reward_timeout); "
                        "it was stopped") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _bad_call(f"reward function {name} raised {type(exc).__name__}" + (f": {detail}" if detail else ""),
                         n, on_error)
    return validate_rewards(values, n, name, on_error=on_error)


def call_reward_func(fn: RewardFunc, name: str, prompts: list, completions: list, **kwargs: Any) -> torch.Tensor:
    """``(N,)`` float32 rewards from one reward function, ``NaN`` where it returned ``None``.

    Raises:
        UserError: the function raised, returned something other than a list of N numbers or ``None``, or
            returned a non-finite number (:func:`run_reward_func` with ``on_error="raise"``).
    """
    return run_reward_func(fn, name, prompts, completions, on_error="raise", **kwargs)[0]


@dataclass
class RewardSource:
    """One weighted source of reward: a Python function or a reward model.

    ``name`` is the metric name (``rewards/<name>/mean``); ``spec`` is how the user named a function
    (``file.py:name``), used in error messages.
    """

    name: str
    weight: float
    func: RewardFunc | None = None
    model: torch.nn.Module | None = None
    spec: str | None = None


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
    for spec, fn, w in zip(reward_funcs or [], funcs, weights):
        base = getattr(fn, "__name__", "reward_func")
        seen[base] = seen.get(base, 0) + 1
        sources.append(RewardSource(base if seen[base] == 1 else f"{base}_{seen[base]}", w, func=fn,
                                    spec=spec if isinstance(spec, str) else None))
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
    on_error: str = "raise",
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
        on_error: what a reward function's failure or bad value does (:func:`validate_rewards`): ``"raise"``
            a :class:`UserError`; ``"drop"`` the completion: its ``total`` is NaN (not 0, so that a dropped
            completion is told apart from a ``None`` reward; ``torch.isnan(total)`` is the drop mask).

    Returns:
        ``(total, per_source)``: ``(N,)`` float32 ``sum_k w_k r_k`` with ``None`` counting as 0 (TRL
        ``GRPOTrainer``: ``nansum(rewards_per_func * reward_weights)``), and ``{name: (N,)}`` unweighted, NaN
        where not applicable or dropped.

    Raises:
        UserError: (``on_error="raise"``) a reward function failed or returned bad values; the message names
            the function by its spec.
    """
    per_source: dict[str, torch.Tensor] = {}
    dropped = torch.zeros(len(completions), dtype=torch.bool)
    for source in sources:
        if source.func is not None:
            per_source[source.name], bad = run_reward_func(
                source.func, source.spec or source.name, prompts, completions, on_error=on_error,
                completion_ids=completion_ids, **columns,
            )
            dropped |= bad
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
    total[dropped] = math.nan
    return total, per_source
