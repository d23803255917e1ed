"""Named registries: the one helper behind every "name -> implementation" table of alignlab.

A :class:`Registry` maps names (a ``--loss_type``, a ``--generation_backend``, a command) to what they select,
in registration order. An entry is registered where it is defined, with the decorator
:meth:`Registry.register` (or :meth:`Registry.add` for an object that is not a function or class), and may
declare the hyperparameters it takes: keyword arguments of its function, each read from a config field of the
same name or of the name given (:class:`Hyperparameter`). Users read the declarations instead of keeping their
own lists: :meth:`Registry.kwargs` builds an entry's keyword arguments from a config, and fails when the config
lacks a declared field, so a new hyperparameter cannot be silently replaced by its function's default.

The registries: methods (:mod:`alignlab.methods`), preference losses (:mod:`alignlab.losses.dpo`), policy
losses (:mod:`alignlab.losses.ppo`), advantage estimators (:mod:`alignlab.advantages.registry`), KL estimators
(:mod:`alignlab.ops.kl`), generation backends (:mod:`alignlab.rollout.engines`) and built-in tasks
(:mod:`alignlab.tasks`).

Source: the pattern of veRL's ``register_adv_est`` / ``get_adv_estimator_fn`` (``verl/trainer/ppo/core_algos.py``)
and TRL's ``loss_type`` tables, with the declared hyperparameters of each entry added.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The :attr:`Hyperparameter.default` of a hyperparameter whose function has no default for it."""


@dataclass(frozen=True)
class Hyperparameter:
    """One declared hyperparameter of a registered entry.

    Attributes:
        name: the keyword argument the entry's function takes.
        field: the config field (and command-line flag) its value is read from; ``None``: no config sets it and
            the function's default always applies (declared so, rather than left out by accident).
        default: the function's default for it, or :data:`REQUIRED`.
    """

    name: str
    field: str | None
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        """Whether the function has no default for it."""
        return self.default is REQUIRED


HyperparameterSpec = Sequence[str] | Mapping[str, str | None]
"""How an entry declares its hyperparameters: keyword names read from config fields of the same names, or
``{keyword: config field}`` (``None``: not set from a config)."""


class Registry(Mapping[str, T], Generic[T]):
    """Names -> entries, in registration order, with each entry's declared hyperparameters.

    A read-only mapping for its users (``name in registry``, ``registry[name]``, iteration); :meth:`get` is the
    lookup with a one-line error that lists the names.

    Args:
        kind: what an entry is, for messages (``"preference loss_type"``, ``"advantage estimator"``).
        error: the exception class :meth:`get` raises for an unknown name (``ValueError``; ``UserError`` where
            the name comes straight from the user).
        message: the text of that error, a format string with ``{kind}``, ``{name}`` (the name asked for, as
            ``repr``) and ``{choices}`` (the names, comma-separated).
        sort_choices: list the names in the error alphabetically instead of in registration order.
        exact: every keyword-only parameter of a registered function must be declared as a hyperparameter
            (else only those without a default must be).
        same: ``same(old, new)``: whether registering ``new`` under a taken name is the same registration again
            (allowed: the entry is replaced); default ``old is new``.
    """

    def __init__(self, kind: str, *, error: type[Exception] = ValueError,
                 message: str = "unknown {kind} {name}; choose from {choices}", sort_choices: bool = False,
                 exact: bool = False, same: Callable[[T, T], bool] | None = None):
        self.kind = kind
        self.error = error
        self.message = message
        self.sort_choices = sort_choices
        self.exact = exact
        self.same = same or (lambda old, new: old is new)
        self._entries: dict[str, T] = {}
        self._hyperparameters: dict[str, tuple[Hyperparameter, ...]] = {}

    # -- the mapping ---------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    # -- registering ---------------------------------------------------------------------------------------
    def add(self, name: str, entry: T, *, hyperparameters: HyperparameterSpec | None = None,
            fn: Callable | None = None) -> T:
        """Register ``entry`` under ``name``; returns it.

        Args:
            hyperparameters: what ``fn`` takes from a config (see :data:`HyperparameterSpec`).
            fn: the function whose keywords are declared (default: ``entry`` itself when it is callable).

        Raises:
            ValueError: ``name`` is taken by another entry, or the declaration does not match ``fn``'s keywords
                (a declared name it does not take; a keyword without a default, or with ``exact`` any
                keyword-only parameter, left undeclared).
        """
        old = self._entries.get(name)
        if old is not None and not self.same(old, entry):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(old)})")
        declared = _declare(name, fn if fn is not None else entry, hyperparameters, exact=self.exact)
        self._entries[name] = entry
        self._hyperparameters[name] = declared
        return entry

    def register(self, *names: str, hyperparameters: HyperparameterSpec | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated function or class under each of ``names`` (several names may
        select the same implementation) and return it unchanged.

        Raises:
            ValueError: as :meth:`add`; no name given.
        """
        if not names:
            raise ValueError(f"register a {self.kind} under at least one name")

        def decorator(entry: T) -> T:
            for name in names:
                self.add(name, entry, hyperparameters=hyperparameters)
            return entry

        return decorator

    def pop(self, name: str, *default: T) -> T:
        """Remove ``name`` and return its entry (``default`` when it is not registered); for tests that
        register an entry of their own."""
        self._hyperparameters.pop(name, None)
        return self._entries.pop(name, *default)

    def __setitem__(self, name: str, entry: T) -> None:
        """Replace (or add) ``name``'s entry as it is, keeping its declaration; for tests that stand an entry
        in for another (``monkeypatch.setitem``)."""
        self._entries[name] = entry
        self._hyperparameters.setdefault(name, ())

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._hyperparameters.pop(name, None)

    # -- reading -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names, in the order :meth:`get`'s error lists them."""
        return sorted(self._entries) if self.sort_choices else list(self._entries)

    def get(self, name: str, *default: Any) -> T:  # type: ignore[override]
        """The entry registered under ``name``; with a ``default``, that for an unknown name (as ``dict.get``).

        Raises:
            ``error``: an unknown name and no default; the one-line message lists the registered names.
        """
        if name in self._entries:
            return self._entries[name]
        if default:
            return default[0]
        raise self.error(self.message.format(kind=self.kind, name=repr(name), choices=", ".join(self.names())))

    def hyperparameters(self, name: str) -> tuple[Hyperparameter, ...]:
        """The hyperparameters ``name`` declares, in declaration order.

        Raises:
            ``error``: an unknown name.
        """
        self.get(name)
        return self._hyperparameters[name]

    def fields(self, name: str) -> tuple[str, ...]:
        """The config fields ``name``'s hyperparameters are read from (those set from a config)."""
        return tuple(h.field for h in self.hyperparameters(name) if h.field is not None)

    def kwargs(self, name: str, config: Any) -> dict[str, Any]:
        """``name``'s keyword arguments read from ``config``: each declared hyperparameter's value, taken from
        its config field; those declared with no field are left to the function's default.

        Raises:
            ``error``: an unknown name.
            ValueError: ``config`` has no attribute for a declared field (a hyperparameter the config's class
                does not offer, which would otherwise silently take the function's default).
        """
        out = {}
        for hyper in self.hyperparameters(name):
            if hyper.field is None:
                continue
            if not hasattr(config, hyper.field):
                raise ValueError(f"{type(config).__name__} has no field {hyper.field!r}, which {self.kind} "
                                 f"{name!r} takes as {hyper.name!r}")
            out[hyper.name] = getattr(config, hyper.field)
        return out


def _describe(entry: Any) -> str:
    return getattr(entry, "__qualname__", None) or getattr(entry, "__name__", None) or type(entry).__name__


def _declare(name: str, fn: Any, spec: HyperparameterSpec | None, *, exact: bool) -> tuple[Hyperparameter, ...]:
    """The :class:`Hyperparameter` records of ``spec``, checked against ``fn``'s keyword parameters."""
    if spec is None:
        spec = ()
    pairs = list(spec.items()) if isinstance(spec, Mapping) else [(h, h) for h in spec]
    if not callable(fn) or inspect.isclass(fn):
        if pairs:
            raise ValueError(f"{name!r} declares hyperparameters {[k for k, _ in pairs]} but has no function")
        return ()
    params = {p.name: p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    keyword_only = [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY]
    declared = [k for k, _ in pairs]
    unknown = [k for k in declared if k not in params]
    undeclared = [k for k in keyword_only if k not in declared
                  and (exact or params[k].default is inspect.Parameter.empty)]
    if unknown or undeclared:
        raise ValueError(f"{_describe(fn)} takes keywords {keyword_only}, but {name!r} declares {declared}")
    return tuple(
        Hyperparameter(k, field, REQUIRED if params[k].default is inspect.Parameter.empty else params[k].default)
        for k, field in pairs
    )


__all__ = ["Hyperparameter", "HyperparameterSpec", "REQUIRED", "Registry"]
