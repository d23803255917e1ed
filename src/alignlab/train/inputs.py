"""The objects a trainer is given in Python, as TRL's trainers take them: a model object, a reference model, a
tokenizer (``processing_class``), ``datasets`` objects, a peft ``LoraConfig``, reward functions and reward
models (:func:`trainer_inputs`).

Every algorithm loads what it trains by name, from its config (``model_name_or_path``, ``dataset_name``,
``reward_model_path``, ...), through :func:`alignlab.models.load_causal_lm`, :func:`~alignlab.models.load_tokenizer`,
:func:`~alignlab.models.load_reward_model`, :func:`~alignlab.models.apply_lora` and
:func:`alignlab.data.io.read_rows`. An object given to the constructor gets a name in the config (the path the
model was loaded from, ``<train_dataset>``, ...) and is registered in a :class:`GivenInputs`; while the
algorithm is built (:func:`given`), each of those loaders hands out the registered object for its name instead
of reading it. So the command line and Python take one path: the same algorithm code, the same checks of rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.errors import UserError

TRAIN_DATASET = "<train_dataset>"
"""``dataset_name`` of a run given a ``train_dataset`` object; its rows are named ``train_dataset row N``."""
EVAL_DATASET = "<eval_dataset>"
"""``eval_dataset_name`` of a run given an ``eval_dataset`` object."""


@dataclass
class GivenInputs:
    """Objects registered for the loaders while an algorithm is built.

    Attributes:
        models: ``(kind, name, model)`` with kind ``"causal_lm"`` or ``"reward"``; each is handed out once, in
            order, to the first load of its kind and name (a policy and a reference loaded from the same path are
            told apart by the order the algorithm loads them: policy first).
        tokenizers: name -> tokenizer.
        datasets: name -> ``datasets.Dataset`` / ``IterableDataset`` / list of row dicts.
        peft_config: a peft config object used instead of the ``lora_*`` fields.
        eval_sets: several eval sets (``eval_dataset`` given as a dict): set name -> its data spec (a file or hub
            id as given, or the name its object is registered under in ``datasets``).
    """

    models: list[tuple[str, str, Any]] = field(default_factory=list)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    peft_config: Any = None
    eval_sets: dict[str, str] = field(default_factory=dict)

    def take_model(self, kind: str, name: str | None):
        """The registered model of ``kind`` and ``name`` not yet handed out (``None`` if there is none)."""
        for i, (k, n, model) in enumerate(self.models):
            if k == kind and n == name:
                del self.models[i]
                return model
        return None


_CURRENT: contextvars.ContextVar[GivenInputs | None] = contextvars.ContextVar("alignlab_given_inputs", default=None)


@contextlib.contextmanager
def given(inputs: GivenInputs | None) -> Iterator[None]:
    """Within the block the loaders hand out ``inputs``' objects (``None``: nothing is registered)."""
    token = _CURRENT.set(inputs)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> GivenInputs | None:
    """The objects registered for the block under way (:func:`given`), if any."""
    return _CURRENT.get()


def given_model(kind: str, name: str | None):
    """The model object registered for a load of ``kind`` (``"causal_lm"``, ``"reward"``) by ``name``, or
    ``None`` (then the loader reads ``name``)."""
    inputs = current()
    return inputs.take_model(kind, name) if inputs is not None else None


def given_tokenizer(name: str | None):
    """The tokenizer registered for ``name``, or ``None``."""
    inputs = current()
    return inputs.tokenizers.get(name) if inputs is not None and name is not None else None


def given_peft_config():
    """The peft config object given to the trainer (``peft_config``), or ``None``."""
    inputs = current()
    return inputs.peft_config if inputs is not None else None


def given_eval_sets() -> dict[str, str]:
    """Several eval sets given as ``eval_dataset={"name": data, ...}``: set name -> the spec its rows are read
    by (:func:`given_rows`); empty when there are not."""
    inputs = current()
    return dict(inputs.eval_sets) if inputs is not None else {}


def given_rows(spec: str) -> list[tuple[str, dict]] | None:
    """The rows of the data set object registered as ``spec``, each with its location (``train_dataset row N``,
    from 1), or ``None`` when ``spec`` names no object.

    Raises:
        DataError: a row that is not a mapping, or no rows.
    """
    from alignlab.errors import DataError

    inputs = current()
    if inputs is None or spec not in inputs.datasets:
        return None
    label = spec.strip("<>")
    rows = []
    for i, row in enumerate(inputs.datasets[spec], start=1):
        if not isinstance(row, dict):
            raise DataError(f"{label} row {i}: expected a mapping of columns, got {type(row).__name__}")
        rows.append((f"{label} row {i}", dict(row)))
    if not rows:
        raise DataError(f"{label}: no rows")
    return rows


# --- turning TRL's constructor arguments into a config and registered objects ---------------------------------
def _is_model(value: Any) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def model_name(model: Any, default: str) -> str:
    """The name a model object goes by: the path or hub id it was loaded from (``config._name_or_path``), else
    ``default``."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else default


def _is_dataset_dict(value: Any) -> bool:
    return isinstance(value, dict) or type(value).__name__ in ("DatasetDict", "IterableDatasetDict")


def _pick_split(value: Any, split: str, argument: str):
    """One data set out of a ``DatasetDict`` / dict of them: the one named ``split``, or the only one."""
    if _is_dataset_dict(value):
        if split in value:
            return value[split]
        if len(value) == 1:
            return next(iter(value.values()))
        raise UserError(f"{argument}: a dict of data sets ({', '.join(map(str, value))}) without a {split!r} split; "
                        "pass one data set")
    return value


def _dataset_field(value: Any, split: str, argument: str, name: str, datasets: dict) -> str | list:
    """The config value for a ``train_dataset`` / ``eval_dataset`` argument: a data spec string as it is, else
    ``name`` with the object registered under it."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    value = _pick_split(value, split, argument)
    if not hasattr(value, "__iter__"):
        raise UserError(f"{argument}: expected a datasets.Dataset, IterableDataset, DatasetDict, a list of rows or "
                        f"a data spec, got {type(value).__name__}")
    datasets[name] = value
    return name


def _is_function_spec(spec: str) -> bool:
    """Whether a ``reward_funcs`` string names a function (``file.py:name``, ``module:name``) rather than a reward
    model (a local folder or a hub id)."""
    if Path(os.path.expanduser(spec)).is_dir():
        return False
    target, sep, name = spec.rpartition(":")
    return bool(sep and target and name.isidentifier()) or "/" not in spec


def _reward_inputs(config, reward_funcs, reward_processing_classes, inputs: GivenInputs) -> dict[str, Any]:
    """Config changes for ``reward_funcs`` as TRL's online trainers take them: functions (callables or specs)
    stay in ``reward_funcs``; one reward model (an object, a folder or a hub id) becomes ``reward_model_path``,
    its weight moved last in ``reward_weights`` (alignlab's order: the functions, then the reward model)."""
    if reward_funcs is None:
        return {}  # the config's own reward_funcs (specs, or functions given in Python) stay as they are
    entries = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    classes = reward_processing_classes
    if classes is not None and not isinstance(classes, (list, tuple)):
        classes = [classes]
    funcs, model_at, changes = [], None, {}
    for i, entry in enumerate(entries):
        is_model = _is_model(entry) or (isinstance(entry, str) and not _is_function_spec(entry))
        if not is_model:
            if not (callable(entry) or isinstance(entry, str)):
                raise UserError(f"reward_funcs[{i}]: expected a function, a reward model or its path, "
                                f"got {type(entry).__name__}")
            funcs.append(entry)
            continue
        if model_at is not None or getattr(config, "reward_model_path", None):
            raise UserError("reward_funcs: one reward model at a time (alignlab scores with a single reward model)")
        model_at = i
        if _is_model(entry):
            name = model_name(entry, "<reward_model>")
            inputs.models.append(("reward", name, entry))
        else:
            name = entry
        changes["reward_model_path"] = name
        tokenizer = classes[i] if classes is not None and i < len(classes) else None
        if tokenizer is None and _is_model(entry) and name.startswith("<"):
            raise UserError("reward_funcs: a reward model object needs its tokenizer in reward_processing_classes")
        if tokenizer is not None:
            inputs.tokenizers[name] = tokenizer
    changes["reward_funcs"] = funcs or None
    weights = getattr(config, "reward_weights", None)
    if model_at is not None and weights and len(weights) == len(entries):
        changes["reward_weights"] = [w for i, w in enumerate(weights) if i != model_at] + [weights[model_at]]
    return changes


def trainer_inputs(config, *, model=None, ref_model=None, train_dataset=None, eval_dataset=None,
                   processing_class=None, peft_config=None, reward_funcs=None, reward_processing_classes=None):
    """TRL's constructor arguments -> ``(config, inputs)``: a copy of ``config`` (rebuilt, so its checks run
    again) naming each object given, and the :class:`GivenInputs` the loaders hand out while the algorithm
    is built. ``config`` itself is left as it was.

    Args:
        config: the algorithm's config (``args``).
        model: a hub id or path (``model_name_or_path``), or a ``PreTrainedModel`` (a peft model trains its
            adapters: ``use_peft`` on, no new adapters).
        ref_model: the reference model, an id, path or model object (configs with ``ref_model_name_or_path``).
        train_dataset, eval_dataset: ``datasets.Dataset``, ``IterableDataset`` (read in full), a list of row
            dicts, or a data spec string (``builtin:NAME``, a file, a hub id). ``train_dataset`` may be a
            ``DatasetDict`` or dict of them (its ``dataset_train_split`` entry, or the only one); ``eval_dataset``
            given as a dict (or ``DatasetDict``) is several eval sets, as in transformers' ``Trainer``: each is
            evaluated, its metrics logged as ``eval_{name}_*``.
        processing_class: the tokenizer.
        peft_config: a peft ``LoraConfig`` (turns ``use_peft`` on; its own settings are used).
        reward_funcs: online methods: a function with TRL's signature, a spec string, a reward model (object,
            folder or hub id), or a list mixing them.
        reward_processing_classes: the reward model's tokenizer (one, or a list matching ``reward_funcs``).

    Raises:
        UserError: an argument the method does not take (a ``ref_model`` without ``ref_model_name_or_path``,
            ``reward_funcs`` for an offline method), a data set of another type, two reward models; anything
            the config's own checks refuse.
    """
    inputs = GivenInputs()
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(config)}
    if model is not None:
        if isinstance(model, (str, os.PathLike)):
            changes["model_name_or_path"] = str(model)
        elif _is_model(model):
            from alignlab.models import is_peft_model

            name = model_name(model, "<model>")
            kind = "reward" if type(config).__name__ == "RewardConfig" else "causal_lm"
            inputs.models.append((kind, name, model))
            changes["model_name_or_path"] = name
            if is_peft_model(model):
                changes["use_peft"] = True
                if peft_config is not None:
                    raise UserError("model is already a peft model: pass peft_config=None")
        else:
            raise UserError(f"model: expected a hub id, a path or a PreTrainedModel, got {type(model).__name__}")
    name = changes.get("model_name_or_path", config.model_name_or_path)
    if processing_class is not None:
        inputs.tokenizers[name] = processing_class
    elif name == "<model>":
        raise UserError("model: this model object does not say where it was loaded from: pass processing_class")
    if ref_model is not None:
        if ref_model is model and _is_model(model):
            raise UserError("model and ref_model cannot be the same object: leave ref_model out for a frozen copy "
                            "of model")
        if "ref_model_name_or_path" not in fields:
            raise UserError(f"ref_model: {type(config).__name__} has no separate reference model (the reference is "
                            "the initial model)")
        if _is_model(ref_model):
            ref_name = model_name(ref_model, "<ref_model>")
            if ref_name == name and not _is_model(model):  # else the policy's load by that name would take it
                ref_name = "<ref_model>"
            inputs.models.append(("causal_lm", ref_name, ref_model))
            changes["ref_model_name_or_path"] = ref_name
        else:
            changes["ref_model_name_or_path"] = str(ref_model)
    if train_dataset is not None:
        changes["dataset_name"] = _dataset_field(train_dataset, config.dataset_train_split, "train_dataset",
                                                 TRAIN_DATASET, inputs.datasets)
    if _is_dataset_dict(eval_dataset):  # as transformers' Trainer: each set evaluated, logged as eval_{name}_*
        for set_name, data in eval_dataset.items():  # a data spec string as it is, an object registered
            inputs.eval_sets[str(set_name)] = _dataset_field(data, config.dataset_test_split,
                                                             f"eval_dataset[{set_name!r}]",
                                                             f"<eval_dataset[{set_name}]>", inputs.datasets)
        if not inputs.eval_sets:
            raise UserError("eval_dataset: an empty dict of data sets")
        changes["eval_dataset_name"] = EVAL_DATASET
    elif eval_dataset is not None:
        changes["eval_dataset_name"] = _dataset_field(eval_dataset, config.dataset_test_split, "eval_dataset",
                                                      EVAL_DATASET, inputs.datasets)
    if peft_config is not None:
        inputs.peft_config = peft_config
        changes["use_peft"] = True
        for ours, theirs in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
            if hasattr(peft_config, theirs):
                changes[ours] = getattr(peft_config, theirs)
        targets = getattr(peft_config, "target_modules", None)
        if targets is not None:
            changes["lora_target_modules"] = [targets] if isinstance(targets, str) else sorted(targets)
    if "reward_funcs" in fields:
        changes.update(_reward_inputs(config, reward_funcs, reward_processing_classes, inputs))
    elif reward_funcs is not None:
        raise UserError(f"reward_funcs: {type(config).__name__} trains on fixed data, without rewards")
    if changes:
        config = dataclasses.replace(config, **changes)
    return config, inputs


# --- the config as plain values --------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if _is_model(value):
        return model_name(value, type(value).__name__)
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"
    return str(value)


def config_as_dict(config) -> dict[str, Any]:
    """The config's fields as plain values for ``config.yaml``, trackers and the model card: a reward function
    given as an object becomes ``module:name``, a model object its path. Unlike ``dataclasses.asdict`` it copies
    no object."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
