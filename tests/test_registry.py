"""The Registry helper: registration by decorator, declared hyperparameters read from configs, one-line lookup
errors; and that every name table of alignlab is one."""

from dataclasses import dataclass

import pytest

from alignlab.errors import UserError
from alignlab.registry import REQUIRED, Hyperparameter, Registry


def _scale(x, *, factor, offset=0.0):
    return factor * x + offset


def test_register_declare_and_read_kwargs_from_a_config():
    registry = Registry("scaler", exact=True)
    assert registry.register("scale", "scale_too", hyperparameters={"factor": "beta", "offset": None})(_scale) is _scale
    assert list(registry) == ["scale", "scale_too"] and registry["scale_too"] is _scale
    assert registry.hyperparameters("scale") == (Hyperparameter("factor", "beta", REQUIRED),
                                                  Hyperparameter("offset", None, 0.0))
    assert registry.fields("scale") == ("beta",)

    @dataclass
    class Config:
        beta: float = 2.0

    kwargs = registry.kwargs("scale", Config())
    assert kwargs == {"factor": 2.0} and registry.get("scale")(3.0, **kwargs) == 6.0  # offset: declared off

    @dataclass
    class Lacking:
        gamma: float = 1.0

    with pytest.raises(ValueError, match="Lacking has no field 'beta', which scaler 'scale' takes as 'factor'"):
        registry.kwargs("scale", Lacking())


def test_declarations_must_match_the_function():
    exact = Registry("scaler", exact=True)
    with pytest.raises(ValueError, match="declares"):  # offset left out: it would silently take its default
        exact.register("scale", hyperparameters=("factor",))(_scale)
    with pytest.raises(ValueError, match="declares"):  # a keyword the function does not take
        exact.register("scale", hyperparameters=("factor", "offset", "bias"))(_scale)
    loose = Registry("scaler")
    with pytest.raises(ValueError, match="declares"):  # without exact, the keywords without a default still must be
        loose.register("scale", hyperparameters=())(_scale)
    loose.register("scale", hyperparameters=("factor",))(_scale)
    assert "scale" not in exact and list(loose) == ["scale"]


def test_duplicates_and_lookup_errors():
    registry = Registry("widget", sort_choices=True)
    registry.add("b", 1)
    registry.add("a", 2)
    registry.add("a", 2)  # the same entry again: allowed
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", 3)
    with pytest.raises(ValueError) as info:
        registry.get("c")
    assert str(info.value) == "unknown widget 'c'; choose from a, b"
    tasks = Registry("task", error=UserError, message="--task: no task {name}; available: {choices}")
    tasks.add("x", object())
    with pytest.raises(UserError, match=r"^--task: no task 'y'; available: x$"):
        tasks.get("y")
    assert registry.get("c", None) is None  # with a default: as dict.get
    assert registry.pop("a") == 2 and "a" not in registry and registry.pop("a", None) is None


def test_every_name_table_is_a_registry():
    from alignlab import methods
    from alignlab.advantages import ADVANTAGE_ESTIMATORS
    from alignlab.losses.dpo import PREFERENCE_LOSSES
    from alignlab.losses.ppo import POLICY_LOSSES
    from alignlab.ops.kl import KL_ESTIMATORS
    from alignlab.rollout.engines import ENGINES
    from alignlab.tasks import TASKS

    methods.methods()
    tables = [methods._METHODS, PREFERENCE_LOSSES, POLICY_LOSSES, ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, ENGINES, TASKS]
    assert all(isinstance(t, Registry) and len(t) for t in tables)
    assert all(cls.name == name for name, cls in ENGINES.items())
    assert all(task.name == name for name, task in TASKS.items())
    with pytest.raises(KeyError, match="unknown command 'nope'; choose from .*dpo"):
        methods.get_method("nope")
