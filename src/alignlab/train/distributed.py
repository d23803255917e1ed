"""Sharding the trained model with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate.

One place builds accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)`` from the flags
(:func:`build_fsdp_plugin`), or takes the one ``accelerate launch --config_file ...`` configured through the
environment; :func:`~alignlab.train.runtime.build_runtime` hands it to accelerate, which shards the model in
``prepare``. What this module adds around it:

* the wrap unit: every decoder layer (the classes in the models' ``_no_split_modules``), and, for a module that
  holds several models (PPO's policy-and-value module), each of those models as a unit of its own, so a forward
  through one of them alone finds its parameters (:func:`set_wrap_classes`);
* FSDP on CPU: accelerate turns FSDP on only for accelerators; on CPU (gloo) :func:`enable_on_cpu` sets the
  same state accelerate sets on a GPU;
* sampling: :func:`gathered_parameters` all-gathers the whole model once around ``generate`` (FSDP2's
  ``unshard()``/``reshard()``), instead of once per decoded token;
* saving: :func:`full_state_dict` gathers the full weights on the main process for a Hugging Face folder.

* frozen models (the reference, a reward model): :func:`shard_frozen` shards them too, decoder layer by decoder
  layer, as TRL's ``prepare_fsdp`` does for its reference model.

The TRL counterparts are ``TrainingArguments.fsdp`` / ``fsdp_config``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alignlab.errors import UserError

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
"""Words ``--fsdp`` takes (transformers' ``FSDPOption`` names that apply to FSDP2)."""

FSDP_CONFIG_KEYS = (
    "min_num_params", "transformer_layer_cls_to_wrap", "cpu_ram_efficient_loading", "activation_checkpointing",
    "reshard_after_forward", "offload_params", "state_dict_type", "version",
)
"""Keys ``--fsdp_config`` takes (with or without transformers' ``fsdp_`` prefix)."""


def parse_fsdp_flag(value: str | list[str] | None) -> list[str]:
    """``--fsdp`` as transformers' ``TrainingArguments`` parses it: space-separated words, e.g.
    ``"full_shard auto_wrap"``; empty means no FSDP.

    Raises:
        UserError: an unknown word, or both ``full_shard`` and ``shard_grad_op``.
    """
    if not value:
        return []
    words = value.split() if isinstance(value, str) else [w for v in value for w in str(v).split()]
    words = [w.lower() for w in words]
    for word in words:
        if word not in FSDP_OPTIONS:
            raise UserError(f"--fsdp: unknown option {word!r} (choose from {', '.join(FSDP_OPTIONS)})")
    if "full_shard" in words and "shard_grad_op" in words:
        raise UserError("--fsdp: give full_shard or shard_grad_op, not both")
    return words


def load_fsdp_config(value: str | dict | None) -> dict[str, Any]:
    """``--fsdp_config``: a dict, a JSON or YAML file, or a JSON string; keys as in transformers
    (:data:`FSDP_CONFIG_KEYS`, the ``fsdp_`` prefix optional). Returns the keys without the prefix.

    Raises:
        UserError: an unreadable file, a value that is not a mapping, or an unknown key.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        data = dict(value)
    else:
        text = str(value)
        if os.path.isfile(text):
            import yaml

            try:
                data = yaml.safe_load(Path(text).read_text(encoding="utf-8"))  # JSON is YAML
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f"{text}:{mark.line + 1}" if mark else text
                raise UserError(f"--fsdp_config: {where}: not JSON or YAML: {getattr(exc, 'problem', None) or exc}") \
                    from exc
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"--fsdp_config: {text} is neither a file nor a JSON mapping") from exc
    if not isinstance(data, dict):
        raise UserError(f"--fsdp_config: expected a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, item in data.items():
        name = key.removeprefix("fsdp_")
        if name not in FSDP_CONFIG_KEYS:
            raise UserError(f"--fsdp_config: unknown key {key!r} (known: {', '.join(FSDP_CONFIG_KEYS)})")
        out[name] = item
    if "version" in out and int(out["version"]) != 2:
        raise UserError(f"--fsdp_config: version {out['version']}: alignlab shards with FSDP2 only (version 2)")
    return out


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise UserError(f"--fsdp_config: {name} must be true or false, got {value!r}")


def build_fsdp_plugin(fsdp: str | list[str] | None, fsdp_config: str | dict | None):
    """accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)`` for ``--fsdp`` / ``--fsdp_config``, or
    the plugin ``accelerate launch`` configured in the environment (``ACCELERATE_USE_FSDP``), or ``None``.

    Decoder layers are the wrap unit (``transformer_based_wrap``, the classes from the model's
    ``_no_split_modules``, or ``transformer_layer_cls_to_wrap``); ``min_num_params`` switches to wrapping by
    size. ``shard_grad_op`` keeps parameters gathered between forward and backward
    (``reshard_after_forward=False``); ``offload`` keeps the shards on the CPU. Checkpoints are sharded
    (``SHARDED_STATE_DICT``: each process writes its shard) unless ``state_dict_type`` says otherwise.

    Raises:
        UserError: a bad flag, an ``accelerate`` config asking for FSDP1, ``--fsdp_config`` without ``--fsdp``.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    words = parse_fsdp_flag(fsdp)
    options = load_fsdp_config(fsdp_config)
    if not words:
        if options and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            raise UserError("--fsdp_config needs --fsdp (e.g. --fsdp full_shard)")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return None
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise UserError("the accelerate config asks for FSDP version 1; alignlab shards with FSDP2: set "
                            "fsdp_version: 2 in its fsdp_config")
        return FullyShardedDataParallelPlugin(fsdp_version=2)  # the rest from accelerate launch's environment
    kwargs: dict[str, Any] = {"fsdp_version": 2}
    reshard = "shard_grad_op" not in words
    if "reshard_after_forward" in options:
        reshard = _as_bool(options["reshard_after_forward"], "reshard_after_forward")
    kwargs["reshard_after_forward"] = reshard
    if options.get("min_num_params"):
        kwargs["auto_wrap_policy"] = "size_based_wrap"
        kwargs["min_num_params"] = int(options["min_num_params"])
    else:
        kwargs["auto_wrap_policy"] = "transformer_based_wrap"
        classes = options.get("transformer_layer_cls_to_wrap")
        if classes:
            kwargs["transformer_cls_names_to_wrap"] = [classes] if isinstance(classes, str) else list(classes)
    if "offload" in words or _as_bool(options.get("offload_params", False), "offload_params"):
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["cpu_offload"] = CPUOffloadPolicy()
    for name in ("cpu_ram_efficient_loading", "activation_checkpointing"):
        if name in options:
            kwargs[name] = _as_bool(options[name], name)
    kwargs["state_dict_type"] = str(options.get("state_dict_type", "SHARDED_STATE_DICT")).upper()
    if kwargs["state_dict_type"] not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise UserError("--fsdp_config: state_dict_type must be SHARDED_STATE_DICT or FULL_STATE_DICT")
    return FullyShardedDataParallelPlugin(**kwargs)


def keep_loading_whole() -> None:
    """Undo the environment switch that makes transformers load weights on rank 0 only
    (``FSDP_CPU_RAM_EFFICIENT_LOADING``, set by accelerate's plugin): alignlab loads every model (or copies the
    frozen ones from the policy) whole on each process, then shards it. With
    ``cpu_ram_efficient_loading`` accelerate still broadcasts the main process's weights into the shards."""
    os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)


def enable_on_cpu(accelerator, plugin) -> None:
    """Turn FSDP on in ``accelerator`` where accelerate left it off: several CPU processes (gloo). accelerate
    enables FSDP only for accelerator devices; FSDP2 itself runs on CPU with gloo, and the state set here is
    what accelerate sets on a GPU (``distributed_type = FSDP`` and the plugin)."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if plugin is None or state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # one process: nothing to shard
    # accelerate copies the process state's type into the accelerator state whenever one is constructed (its
    # optimizer wrapper does), so both say FSDP. Collectives stay gloo's; accelerate's barrier for FSDP passes
    # device ids, which gloo accepts.
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def is_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards models with FSDP2."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) was sharded with ``fully_shard``; False on a torch without
    FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it in torch.distributed._composable.fsdp
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _pretrained_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` instances inside ``model`` (itself included)."""
    from transformers import PreTrainedModel

    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        if isinstance(module, PreTrainedModel):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def _layer_class_names(plugin, models: list[torch.nn.Module]) -> list[str]:
    """The decoder-layer classes to wrap: ``transformer_layer_cls_to_wrap`` when given, else the classes in the
    ``_no_split_modules`` of ``models`` that are present in them."""
    names = list(plugin.transformer_cls_names_to_wrap or [])
    if names:
        return names
    for inner in models:
        for name in getattr(inner, "_no_split_modules", None) or []:
            present = any(type(m).__name__ == name for m in inner.modules())
            if present and name not in names:
                names.append(name)
    return names


def set_wrap_classes(accelerator, model: torch.nn.Module) -> None:
    """Name the classes accelerate wraps in ``model`` before ``prepare``: the decoder layers
    (``_no_split_modules`` of every Hugging Face model inside ``model``, unless ``transformer_layer_cls_to_wrap``
    named them) and, when ``model`` holds several models (PPO's policy and value model), each of those models.
    A forward through one of them alone then gathers everything it uses. Does nothing without transformer-based
    wrapping."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return
    models = _pretrained_models(model)
    names = _layer_class_names(plugin, models)
    if len(models) > 1 or (models and models[0] is not model and not _is_peft_wrapper(model, models[0])):
        for inner in models:
            if type(inner).__name__ not in names:
                names.append(type(inner).__name__)
    plugin.transformer_cls_names_to_wrap = names or None


def shard_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the reference, a reward model) with FSDP2 when ``accelerator`` shards the trained
    one; otherwise return it unchanged.

    Each decoder layer (the classes of ``_no_split_modules``, or ``transformer_layer_cls_to_wrap``) is one unit
    and the rest of the model (embeddings, final norm, heads) the root, all resharded after their forward
    (``--fsdp_config offload_params`` keeps the shards on the CPU), so a process holds ``1/N`` of the weights
    plus one gathered layer at a time. The counterpart of TRL's ``prepare_fsdp`` for its reference model,
    which shards the root only. Every process must run each forward of a sharded model (an all-gather is
    collective): the algorithms call the reference and reward model once per step on every process.

    ``model`` must already be frozen (``requires_grad_(False)``) and on ``accelerator.device``; it is sharded
    in place and returned.
    """
    if not is_fsdp(accelerator) or is_sharded(model):
        return model
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    kwargs: dict[str, Any] = {"reshard_after_forward": True}
    if isinstance(plugin.cpu_offload, OffloadPolicy):
        kwargs["offload_policy"] = plugin.cpu_offload
    names = set(_layer_class_names(plugin, _pretrained_models(model)))
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _is_peft_wrapper(model: torch.nn.Module, inner: torch.nn.Module) -> bool:
    """A peft model around ``inner``: its forward is ``inner``'s, so the root unit holds the same parameters."""
    from alignlab.models import is_peft_model

    return is_peft_model(model)


def initialize(model: torch.nn.Module) -> None:
    """After ``prepare``: settle which FSDP unit is the root (FSDP2 decides it lazily, at the first forward): before anything runs
    a forward through a part of ``model`` (a decoder layer, PPO's policy alone), the root must know its
    sub-units, or the part would make itself a root."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    model._get_fsdp_state()._lazy_init()
    # The models inside a composite (PPO's policy and value model) keep their own parameters (embeddings, final
    # norm, heads) gathered from forward to backward, as accelerate keeps the root's and the output head's:
    # the value model's loss reads its score head through a forward hook (rollout.scoring.token_scores), not
    # through the unit's output, so FSDP's pre-backward gather of that unit never runs.
    for inner in _pretrained_models(model):
        if inner is not model and isinstance(inner, FSDPModule):
            inner.set_reshard_after_forward(False, recurse=False)


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """All-gather every FSDP2 unit inside ``model`` for the length of the block (the FSDP2 counterpart of
    FSDP1's ``summon_full_params``; TRL gathers the same way around generation), then free the gathered copies.

    Inside the block each unit's forward finds its parameters already gathered and keeps them (its
    ``reshard_after_forward`` is suspended), so a ``generate`` call all-gathers once, not once per token.
    Every process must enter the block (an all-gather is collective). A model without FSDP units passes
    through unchanged. Memory: one full copy of ``model``'s parameters per process while inside.
    """
    units = _fsdp_modules(model)
    if not units:
        yield model
        return
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        for group in state._fsdp_param_groups:
            saved.append((group, group.post_forward_mesh_info))
            group.post_forward_mesh_info = None  # no reshard after each forward inside the block
    setattr(model, _GATHERED, True)
    try:
        for unit in units:
            unit.unshard()
        yield model
    finally:
        for unit in units:
            unit.reshard()
        for group, info in saved:
            group.post_forward_mesh_info = info
        model.__dict__.pop(_GATHERED, None)


_GATHERED = "_alignlab_gathered"
"""Set on a model inside :func:`gathered_parameters`."""


def forwards_gather(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` all-gathers weights with the other processes: it is sharded with FSDP2
    across more than one process and not inside :func:`gathered_parameters`. Every process must then run the
    same number of forwards (a process that stopped early would leave the others waiting)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() < 2 or model.__dict__.get(_GATHERED, False):
        return False
    return is_sharded(model)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded ``model`` on the main process, on the CPU; an empty dict on
    the others (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict`` and
    ``cpu_offload``), tied weights once. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # a tied weight (lm_head = embed_tokens) is saved once, as transformers does
            state.pop(name, None)
        seen.add(id(param))
    return state


def sub_state_dict(state_dict: dict[str, torch.Tensor], root: torch.nn.Module,
                   part: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``root``'s ``state_dict`` that belong to its submodule ``part``, with ``part``'s own key
    names (e.g. the policy's weights out of PPO's policy-and-value module).

    Raises:
        ValueError: ``part`` is not inside ``root``.
    """
    if part is root:
        return state_dict
    for name, module in root.named_modules():
        if module is part:
            prefix = name + "."
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    raise ValueError("the module to save is not part of the trained model")


def shutdown(succeeded: bool) -> None:
    """End this process's part of a multi-process run before the interpreter exits: wait for the other processes
    (only after a run that succeeded, where every process reaches this point), destroy every process group, and
    free what still refers to them (the FSDP2 models' meshes and hooks).

    Left to the interpreter's exit, gloo's worker threads of a process group that garbage collection destroys
    late can try to take the interpreter lock after finalization began; Python then ends those threads, and the
    C++ runtime aborts the process (``terminate called without an active exception``, exit signal 6) after the
    run's work is done. Does nothing in a one-process run. The counterpart in accelerate is
    ``PartialState.destroy_process_group``.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
