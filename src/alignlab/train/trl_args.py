"""transformers' ``TrainingArguments`` fields and TRL's ``ModelConfig`` fields on every training config, so that a
TRL user's flags, YAML recipes and Python configs carry over unchanged (docs/trl.md).

:class:`TrainingArgumentsFields` is built from ``transformers.TrainingArguments`` itself: every public field with
its name, type, default and ``--help`` text; :class:`~alignlab.train.config.TrainConfig` inherits it and
re-declares the fields alignlab documents itself (a subclass's declaration wins). :class:`ModelArgumentsFields`
holds TRL ``ModelConfig``'s model-loading fields (``dtype``, ``attn_implementation``, ``model_revision``, 4/8-bit
loading, rsLoRA and DoRA).

What each field does here is decided in one place: implemented (the loop, the runtime, model loading), or one of
:data:`EXCEPTIONS` (a one-line ``UserError`` for a value alignlab cannot honour, or a one-line warning where the
value cannot change the result), checked by :func:`check_trl_args` when a config is built. A field that only
matters together with another one (``hub_model_id`` without ``push_to_hub``, ``vllm_server_port`` without
``use_vllm``) means here what it means in TRL: nothing until that other one is set.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from alignlab.errors import UserError

logger = logging.getLogger(__name__)


def _training_arguments_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """``TrainingArguments``' public init fields as ``make_dataclass`` specs (name, type, a fresh field with the
    same default and metadata)."""
    from transformers import TrainingArguments

    specs = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        kwargs: dict[str, Any] = {"metadata": dict(f.metadata)}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = None
        specs.append((f.name, f.type, dataclasses.field(**kwargs)))
    return specs


TrainingArgumentsFields = dataclasses.make_dataclass("TrainingArgumentsFields", _training_arguments_fields())
TrainingArgumentsFields.__module__ = __name__
TrainingArgumentsFields.__doc__ = (
    "Every public field of transformers' ``TrainingArguments`` (name, type, default, help), as a base of "
    ":class:`~alignlab.train.config.TrainConfig`.")


@dataclass
class ModelArgumentsFields:
    """TRL ``ModelConfig``'s fields that the training configs lack elsewhere (names and defaults as TRL's)."""

    model_revision: str = "main"
    """Branch, tag or commit of a hub model (``from_pretrained(revision=...)``)."""
    dtype: str | None = "float32"
    """Dtype the weights are loaded in: float32 (mixed precision then comes from ``bf16``), bfloat16, float16
    (pure low-precision training), or auto (the checkpoint's own)."""
    torch_dtype: str | None = None
    """The earlier name of ``dtype`` (older TRL recipes and scripts); when set it wins over ``dtype``."""
    attn_implementation: str | None = None
    """Attention kernel (``from_pretrained(attn_implementation=...)``): eager, sdpa, flash_attention_2, ...;
    unset: transformers' choice."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (scale ``lora_alpha / sqrt(r)``), peft's ``LoraConfig(use_rslora=True)``."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA), peft's ``LoraConfig(use_dora=True)``."""
    lora_modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (peft's ``modules_to_save``)."""
    lora_target_parameters: list[str] | None = None
    """Parameter names to adapt besides ``lora_target_modules`` (peft's ``target_parameters``, e.g. MoE experts)."""
    load_in_4bit: bool = False
    """Load the base model in 4 bits with bitsandbytes (QLoRA, with ``use_peft``). Needs bitsandbytes and a
    device it supports; elsewhere a one-line error naming the device."""
    load_in_8bit: bool = False
    """Load the base model in 8 bits with bitsandbytes (as ``load_in_4bit``)."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit quantisation type (bitsandbytes): nf4 or fp4."""
    use_bnb_nested_quant: bool = False
    """Quantise the 4-bit quantisation constants again (bitsandbytes' double quantisation)."""
    bnb_4bit_quant_storage: str | None = None
    """Dtype the 4-bit weights are stored in (bitsandbytes' ``bnb_4bit_quant_storage``)."""


@dataclass
class TrlCommonFields:
    """Fields several of TRL's trainer configs share (names and defaults as TRL 1.16's)."""

    model_init_kwargs: dict[str, Any] | str | None = None
    """More ``from_pretrained`` keyword arguments for the trained model (a mapping, or JSON on the command
    line); they win over ``dtype`` / ``attn_implementation`` / ``model_revision``."""
    dataset_num_proc: int | None = None
    """Processes for preprocessing the data set. alignlab tokenises in the training process (docs/trl.md)."""
    pad_to_multiple_of: int | str | None = "auto"
    """Pad batch sequences to a multiple of this. alignlab pads (or packs) its own way (docs/trl.md)."""
    activation_offloading: bool = False
    """Keep the activations saved for the backward pass in CPU memory during the training forwards
    (``torch.autograd.graph.save_on_cpu``, TRL's saved-tensor hooks): less GPU memory, the same numbers."""
    router_aux_loss_coef: float | None = None
    """Weight of a mixture-of-experts router's auxiliary loss (docs/trl.md)."""
    pad_token: str | None = None
    """Padding token to set on the tokenizer (unset: the tokenizer's, else its end-of-sequence token)."""
    eos_token: str | None = None
    """End-of-sequence token to set on the tokenizer (unset: the tokenizer's)."""
    chat_template_path: str | None = None
    """A chat template to use instead of the tokenizer's: a Jinja file, or a tokenizer directory or hub id whose
    template is taken."""


def apply_tokenizer_options(tokenizer: Any, config: Any) -> Any:
    """Set ``pad_token``, ``eos_token`` and ``chat_template_path`` (TRL's fields) on ``tokenizer``; returns it.

    Raises:
        UserError: a token the vocabulary lacks, or an unreadable ``chat_template_path``.
    """
    import os

    for name in ("pad_token", "eos_token"):
        token = getattr(config, name, None)
        if token is None:
            continue
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise UserError(f"--{name} {token!r} is not a token of the tokenizer's vocabulary")
        setattr(tokenizer, name, token)
    path = getattr(config, "chat_template_path", None)
    if path:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                tokenizer.chat_template = handle.read()
        else:
            from alignlab.models import load_tokenizer

            other = load_tokenizer(path, flag="--chat_template_path")
            if not getattr(other, "chat_template", None):
                raise UserError(f"--chat_template_path {path}: neither a template file nor a tokenizer with a "
                                "chat template")
            tokenizer.chat_template = other.chat_template
    return tokenizer


@dataclass(frozen=True)
class Unsupported:
    """A field alignlab accepts with TRL's name and default but whose other values it does not honour.

    Attributes:
        why: the reason (needs vLLM, needs a hub account, a GPU-only kernel, ...).
        error: a value other than the default stops with a one-line ``UserError``; otherwise it is a one-line
            warning (only where the value cannot change the trained model).
        only: see the attribute.
    """

    why: str
    error: bool = True
    only: str | None = None
    """Applies only to configs with this class among their bases (a field name that another config
    implements, e.g. ``max_completion_length``)."""


EXCEPTIONS: dict[str, Unsupported] = {
    "push_to_hub": Unsupported("needs a Hugging Face hub account; upload the saved output_dir with "
                              "`huggingface-cli upload` instead"),
    "trackio_space_id": Unsupported("a Trackio Space needs a Hugging Face hub account; report_to trackio logs "
                                   "locally without it"),
    "log_completions_hub_repo": Unsupported("needs a Hugging Face hub account; completions are written to "
                                           "samples.jsonl"),
    "deepspeed": Unsupported("needs DeepSpeed; alignlab shards with PyTorch FSDP2 (--fsdp full_shard)"),
    "parallelism_config": Unsupported("tensor and context parallelism are not implemented; alignlab runs DDP or "
                                     "FSDP2 (--fsdp)"),
    "use_vllm": Unsupported("needs vLLM (a CUDA GPU); alignlab samples with transformers' generate or its paged "
                           "engine (--generation_backend)"),
    "fp16": Unsupported("float16 mixed precision needs loss scaling, which alignlab does not implement; use bf16"),
    "auto_find_batch_size": Unsupported("retrying smaller batches after a CUDA out-of-memory error is not "
                                       "implemented; set per_device_train_batch_size"),
    "load_best_model_at_end": Unsupported("reloading the best checkpoint is not implemented; the last model is "
                                         "saved and every checkpoint-N is kept (save_total_limit)"),
    "router_aux_loss_coef": Unsupported("the mixture-of-experts router loss is not added"),
    "average_tokens_across_devices": Unsupported("each micro-batch's loss is its own mean (over its tokens or "
                                                "pairs); an update averages its micro-batches and the "
                                                "processes"),
    "use_liger_kernel": Unsupported("Liger kernels are GPU-only (Triton); the result is the same without them",
                                   error=False),
    "dataset_num_proc": Unsupported("alignlab tokenises in the training process; the result is the same",
                                   error=False),
    "label_smoothing_factor": Unsupported("label smoothing of the SFT loss is not implemented (TRL's other trainers "
                                         "ignore it too)", only="SFTConfig"),
    "pad_to_multiple_of": Unsupported("alignlab pads or packs batches its own way; padding is masked, so only speed "
                                     "differs", error=False),
    "transformers_continuous_batching_config": Unsupported("alignlab's paged engine sizes itself; only speed "
                                                          "differs", error=False),
    "cast_lm_head_to_fp32": Unsupported("a float32 LM head under bf16 is not implemented (alignlab keeps float32 "
                                       "weights and bf16 autocast)"),
    "use_weighting": Unsupported("WPO weighting is not implemented"),
    "generate_during_eval": Unsupported("sampling at evaluation is not implemented"),
    "is_encoder_decoder": Unsupported("alignlab trains decoder-only models"),
    "dataset_kwargs": Unsupported("alignlab prepares every data set itself"),
}
"""The documented exceptions (docs/trl.md's table lists the same names): each field keeps TRL's name and default;
another value stops with a one-line error, or (``error=False``) logs a one-line warning."""

GENERATION_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The ``generation_kwargs`` keys alignlab's engines honour (the ``SamplingParams`` they share)."""

VALUE_EXCEPTIONS: dict[str, dict[Any, str]] = {
    "save_strategy": {"best": "saving on the best metric needs load_best_model_at_end, which is not implemented"},
    "lr_scheduler_type": {"reduce_lr_on_plateau": "needs a metric after every evaluation, which is not "
                          "implemented"},
    "train_sampling_strategy": {"group_by_length": "length-grouped sampling is not implemented",
                                "batch_rebalance": "length-rebalanced sampling is not implemented"},
    "debug": {"tpu_metrics_debug": "TPUs are not supported"},
}
"""Single values of otherwise implemented fields that alignlab refuses, with the reason."""


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def check_trl_args(config: Any) -> None:
    """Stop on a value alignlab does not honour, or warn where it cannot change the result (:data:`EXCEPTIONS`,
    :data:`VALUE_EXCEPTIONS`); also check the strategy names and normalise ``lr_scheduler_kwargs`` /
    ``gradient_checkpointing_kwargs`` / ``model_init_kwargs`` given as JSON strings.

    Raises:
        UserError: one line naming the flag, the value and why.
    """
    import json

    cls = type(config)
    bases = {klass.__name__ for klass in cls.__mro__}
    for name, exc in EXCEPTIONS.items():
        if not hasattr(config, name) or (exc.only is not None and exc.only not in bases):
            continue
        value, default = getattr(config, name), _default(cls, name)
        if value == default or (value in (None, False, "", []) and default in (None, False, "", [])):
            continue
        message = f"--{name} {value}: not supported here ({exc.why})"
        if exc.error:
            raise UserError(message)
        logger.warning("%s; ignored", message)
    for name, refused in VALUE_EXCEPTIONS.items():
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else str(value or "").split()
        for item in values:
            if str(item) in refused:
                raise UserError(f"--{name} {item}: not supported here ({refused[str(item)]})")
    for name in ("eval_strategy", "save_strategy", "logging_strategy"):
        value = str(getattr(config, name, "no"))
        allowed = ("no", "steps", "epoch", "best") if name == "save_strategy" else ("no", "steps", "epoch")
        if value not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        setattr(config, name, value)
    if getattr(config, "sync_ref_model", False) and (config.use_peft or getattr(config, "precompute_ref_log_probs",
                                                                                 False)):
        raise UserError("--sync_ref_model updates a separate reference model: drop --use_peft / "
                        "--precompute_ref_log_probs (as TRL)")
    if getattr(config, "load_in_4bit", False) and getattr(config, "load_in_8bit", False):
        raise UserError("--load_in_4bit and --load_in_8bit: choose one")
    for name in ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs",
                 "model_init_kwargs", "generation_kwargs", "chat_template_kwargs"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                setattr(config, name, json.loads(value))
            except json.JSONDecodeError as exc:
                raise UserError(f"--{name}: not a JSON object: {exc.msg}") from exc
        elif value is not None and not isinstance(value, dict):
            raise UserError(f"--{name} must be a JSON object (a mapping in YAML), got {value!r}")
    unknown = sorted(set(getattr(config, "generation_kwargs", None) or {}) - set(GENERATION_KWARGS))
    if unknown:
        raise UserError(f"--generation_kwargs: {', '.join(unknown)} not supported here (alignlab's engines take "
                        f"{', '.join(GENERATION_KWARGS)})")
    if getattr(config, "generation_kwargs", None):
        from alignlab.rollout.engines.base import SamplingParams

        try:
            SamplingParams(max_new_tokens=1, eos_token_id=0, pad_token_id=0, **config.generation_kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"--generation_kwargs: {exc}") from exc
    model_init_kwargs(config)  # a bad --dtype, or 4/8-bit loading this machine cannot do, stops here


def accelerator_options(config: Any) -> dict[str, Any]:
    """``accelerate.Accelerator`` keyword arguments from the ``ddp_*`` fields (``DistributedDataParallelKwargs``
    for ``ddp_find_unused_parameters``, ``ddp_bucket_cap_mb``, ``ddp_broadcast_buffers``, ``ddp_static_graph``;
    ``InitProcessGroupKwargs`` for ``ddp_backend`` and ``ddp_timeout`` seconds), as ``TrainingArguments`` passes
    them; ``accelerator_config``'s data-loader keys (``split_batches``, ``dispatch_batches``, ``even_batches``,
    ``use_seedable_sampler``, default true here, ``non_blocking``) as a ``DataLoaderConfiguration``; and
    ``torch_compile`` (with ``torch_compile_backend``, default inductor, and ``torch_compile_mode``) as a
    ``TorchDynamoPlugin``, so accelerate compiles the trained model in ``prepare``; ``save_on_each_node`` as a
    ``ProjectConfiguration`` (accelerate then writes checkpoint files on every machine). Also applies ``tf32`` (TF32 matrix products on Ampere and newer GPUs; no effect elsewhere) and
    ``log_level`` / ``log_level_replica`` (transformers' and alignlab's log verbosity on the main process and
    the others).

    Raises:
        UserError: an ``accelerator_config`` that is not a mapping, a JSON string or a JSON file, or that has
            keys other than the data-loader ones (alignlab accumulates gradients itself).
    """
    import json
    import os
    from datetime import timedelta

    import torch
    from accelerate.utils import (
        DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, TorchDynamoPlugin,
    )

    if getattr(config, "tf32", None) is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(config.tf32)
        torch.backends.cudnn.allow_tf32 = bool(config.tf32)
    level = config.log_level if int(os.environ.get("RANK", "0")) == 0 else config.log_level_replica
    if level and level != "passive":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.get_log_levels_dict()[level])
        logging.getLogger("alignlab").setLevel(hf_logging.get_log_levels_dict()[level])
    ddp = {name: getattr(config, f"ddp_{name}") for name in
           ("find_unused_parameters", "bucket_cap_mb", "broadcast_buffers", "static_graph")
           if getattr(config, f"ddp_{name}", None) is not None}
    handlers = []
    if config.ddp_backend is not None or config.ddp_timeout != 1800:  # otherwise accelerate's own choice
        group = {"timeout": timedelta(seconds=config.ddp_timeout)}
        if config.ddp_backend is not None:
            group["backend"] = config.ddp_backend
        handlers.append(InitProcessGroupKwargs(**group))
    if ddp:
        handlers.append(DistributedDataParallelKwargs(**ddp))
    loader = {"use_seedable_sampler": True}
    extra = getattr(config, "accelerator_config", None)
    if isinstance(extra, str):
        try:
            if os.path.isfile(extra):
                with open(extra, encoding="utf-8") as handle:
                    extra = json.load(handle)
            else:
                extra = json.loads(extra)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--accelerator_config: neither a JSON file nor a JSON object: {exc}") from exc
    if extra is not None and not isinstance(extra, dict):
        raise UserError(f"--accelerator_config must be a mapping, got {extra!r}")
    allowed = ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler", "non_blocking")
    for key, value in (extra or {}).items():
        if key not in allowed:
            raise UserError(f"--accelerator_config: key {key!r} is not supported here (only {', '.join(allowed)}; "
                            "alignlab accumulates gradients itself)")
        loader[key] = value
    options = {"kwargs_handlers": handlers, "dataloader_config": DataLoaderConfiguration(**loader)}
    if getattr(config, "save_on_each_node", False):  # accelerate's save_state writes on every machine
        from accelerate.utils import ProjectConfiguration

        options["project_config"] = ProjectConfiguration(save_on_each_node=True)
    if getattr(config, "torch_compile", False) or getattr(config, "torch_compile_backend", None):
        dynamo = {"backend": config.torch_compile_backend or "inductor"}
        if config.torch_compile_mode:
            dynamo["mode"] = config.torch_compile_mode
        options["dynamo_plugin"] = TorchDynamoPlugin(**dynamo)
    return options


def prepare_options(model: Any, config: Any) -> None:
    """Training-time model options of ``TrainingArguments``: ``neftune_noise_alpha`` (NEFTune noise on the input
    embeddings in training mode, transformers' ``activate_neftune``; Jain et al. 2023, arXiv 2310.05914) and
    ``debug underflow_overflow`` (transformers' ``DebugUnderflowOverflow`` detector)."""
    alpha = getattr(config, "neftune_noise_alpha", None)
    if alpha:
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(model, alpha)
    debug = getattr(config, "debug", "") or ""
    if "underflow_overflow" in (debug.split() if isinstance(debug, str) else [str(d) for d in debug]):
        from transformers.debug_utils import DebugUnderflowOverflow

        DebugUnderflowOverflow(model)


def model_init_kwargs(config: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of the trained model, as TRL builds them: ``model_revision``,
    ``dtype``, ``attn_implementation``, a bitsandbytes ``quantization_config`` for ``load_in_4bit`` /
    ``load_in_8bit`` (with the process's device as ``device_map``), then ``model_init_kwargs`` (which win).

    Raises:
        UserError: an unknown ``dtype``; 4/8-bit loading where bitsandbytes is missing or does not support the
            device (one line naming the device).
    """
    import torch

    kwargs: dict[str, Any] = {}
    if getattr(config, "model_revision", "main") not in (None, "main"):
        kwargs["revision"] = config.model_revision
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", "float32")
    if dtype not in (None, "auto"):
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            flag = "--torch_dtype" if getattr(config, "torch_dtype", None) else "--dtype"
            raise UserError(f"{flag}: unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype == "auto":
        kwargs["dtype"] = "auto"
    if getattr(config, "attn_implementation", None):
        kwargs["attn_implementation"] = config.attn_implementation
    if getattr(config, "load_in_4bit", False) or getattr(config, "load_in_8bit", False):
        kwargs.update(_quantization_kwargs(config, kwargs.get("dtype")))
    kwargs.update(getattr(config, "model_init_kwargs", None) or {})
    return kwargs


def _quantization_kwargs(config: Any, dtype: Any) -> dict[str, Any]:
    """``quantization_config`` and ``device_map`` for bitsandbytes loading (TRL's ``get_quantization_config``
    and ``get_kbit_device_map``)."""
    import importlib.util

    import torch

    from alignlab.models import default_device

    flag = "--load_in_4bit" if config.load_in_4bit else "--load_in_8bit"
    device = torch.device("cpu") if getattr(config, "use_cpu", False) else default_device()
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag} needs bitsandbytes, which is not installed (pip install bitsandbytes); this "
                        f"machine's device is {device.type}")
    if device.type != "cuda":
        raise UserError(f"{flag}: bitsandbytes quantised training is not supported on this device "
                        f"({device.type}); run on a CUDA GPU or drop the flag")
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit, bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type, bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
        bnb_4bit_quant_storage=config.bnb_4bit_quant_storage)
    import os

    return {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


@dataclass
class VllmFields:
    """TRL's vLLM settings of the online trainers. ``use_vllm`` is a documented exception; the others only matter
    with it (as in TRL) and keep TRL's names and defaults."""

    use_vllm: bool = False
    """Sample with vLLM (not available here: docs/trl.md)."""
    vllm_mode: str = "colocate"
    """vLLM integration, server or colocate (with ``use_vllm``)."""
    vllm_model_impl: str = "vllm"
    """vLLM's model implementation, vllm or transformers (with ``use_vllm``)."""
    vllm_enable_sleep_mode: bool = False
    """Offload vLLM's weights and cache during the optimizer step (with ``use_vllm``)."""
    vllm_structured_outputs_regex: str | None = None
    """Regex for vLLM's structured outputs (with ``use_vllm``)."""
    vllm_server_base_url: str | None = None
    """Base URL of a vLLM server (with ``use_vllm`` and ``vllm_mode`` server)."""
    vllm_server_host: str = "0.0.0.0"
    """Host of the vLLM server (with ``use_vllm`` and ``vllm_mode`` server)."""
    vllm_server_port: int = 8000
    """Port of the vLLM server (with ``use_vllm`` and ``vllm_mode`` server)."""
    vllm_server_timeout: float = 240.0
    """Seconds to wait for the vLLM server (with ``use_vllm`` and ``vllm_mode`` server)."""
    vllm_group_port: int = 51216
    """Port of the weight-update group (with ``use_vllm`` and ``vllm_mode`` server)."""
    vllm_gpu_memory_utilization: float = 0.3
    """GPU memory share of a colocated vLLM (with ``use_vllm``)."""
    vllm_max_model_length: int | None = None
    """vLLM's context window (with ``use_vllm``)."""
    vllm_tensor_parallel_size: int = 1
    """Tensor-parallel size of a colocated vLLM (with ``use_vllm``)."""
    ds3_gather_for_generation: bool = True
    """Gather DeepSpeed ZeRO-3 weights for generation (with ``deepspeed``, a documented exception)."""


@dataclass
class PolicyGradientTrlFields:
    """Fields TRL's ``GRPOConfig`` and ``RLOOConfig`` share that the alignlab configs declare nowhere else."""

    num_generations_eval: int | None = None
    """Completions per eval prompt (GRPO, RLOO; fewer than ``num_generations`` saves time; unset: as training);
    ``per_device_eval_batch_size`` must be a multiple of it."""
    generation_kwargs: dict[str, Any] | str | None = None
    """Sampling settings that override the flags of the same name when sampling completions (a mapping, or JSON
    on the command line), as TRL's ``generation_kwargs`` override its ``GenerationConfig``: ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` (the losses' log-probs keep ``--temperature``, as
    TRL); other keys are refused with a one-line error (:data:`GENERATION_KWARGS`)."""
    chat_template_kwargs: dict[str, Any] | str | None = None
    """More ``apply_chat_template`` keyword arguments (template variables, e.g. ``{"enable_thinking": false}``)
    for rendering conversational prompts (a mapping, or JSON on the command line)."""
    cache_implementation: str | None = None
    """KV cache of transformers' ``generate``: dynamic samples with ``--generation_backend generate`` (its
    ``DynamicCache``), static with ``--generation_backend static`` (``StaticCache``, the decode step compiled);
    other caches are refused with one line (unset: ``--generation_backend`` decides)."""
    transformers_continuous_batching_config: dict[str, Any] | str | None = None
    """``ContinuousBatchingConfig`` settings (a speed setting; alignlab's paged engine sizes itself)."""
    sync_ref_model: bool = False
    """TR-DPO: every ``ref_model_sync_steps`` steps the reference model moves to ``ref_model_mixup_alpha *
    policy + (1 - ref_model_mixup_alpha) * reference`` (needs a separate reference model)."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO's mixing weight (with ``sync_ref_model``)."""
    ref_model_sync_steps: int = 512
    """TR-DPO's update period (with ``sync_ref_model``)."""
    log_multimodal: bool = True
    """Log images with the completions (with ``log_completions``)."""
    num_completions_to_print: int | None = None
    """Completions printed (with ``log_completions``)."""
    log_unique_prompts: bool = False
    """Log each prompt once (with ``log_completions``)."""


@dataclass
class GRPOTrlFields:
    """TRL ``GRPOConfig`` fields the alignlab config declares nowhere else (names and defaults as TRL's)."""

    cast_lm_head_to_fp32: bool = False
    """Run the LM head in float32 (ScaleRL; not implemented: docs/trl.md)."""
    vespo_k_pos: float = 2.0
    """VESPO's power for positive advantages (with ``loss_type`` vespo, which is not offered)."""
    vespo_lambda_pos: float = 3.0
    """VESPO's decay for positive advantages (with ``loss_type`` vespo)."""
    vespo_k_neg: float = 3.0
    """VESPO's power for negative advantages (with ``loss_type`` vespo)."""
    vespo_lambda_neg: float = 2.0
    """VESPO's decay for negative advantages (with ``loss_type`` vespo)."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """Several reward sources: sum_then_normalize (the weighted sum, then ``scale_rewards``' normalisation;
    TRL's default) or normalize_then_sum (GDPO, arXiv 2601.05242: each source normalised within its group, the
    weighted sum, then divided by its batch std; ``scale_rewards`` unused, as TRL)."""
    top_entropy_quantile: float = 1.0
    """rho of "Beyond the 80/20 Rule" (arXiv 2506.01939): only the top ``rho`` share of completion tokens by the
    policy's entropy count in the policy loss (the quantile over the micro-batch of every process, as TRL); 1.0
    keeps all, 0.0 only the highest; the paper recommends 0.2."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss minus ``entropy_coef`` times the mean per-token entropy of the
    policy over the tokens of the policy term, with its gradient (the forward then makes the completion
    positions' logits instead of using the chunked output head); 0: off."""
    use_adaptive_entropy: bool = False
    """Skywork-OR1's adaptive entropy control (arXiv 2505.22312): ``entropy_coef`` is the starting coefficient;
    after every optimizer step it moves up by ``entropy_coef_delta`` when the step's mean token entropy is at or
    below ``entropy_target``, down otherwise (within ``entropy_coef_min`` / ``entropy_coef_max``), and the bonus
    applies only while the entropy is at or below the target; saved in checkpoints."""
    entropy_coef_min: float = 0.0
    """Lower bound of the adaptive entropy coefficient (with ``use_adaptive_entropy``)."""
    entropy_coef_max: float = 1.0
    """Upper bound of the adaptive entropy coefficient (with ``use_adaptive_entropy``)."""
    entropy_coef_delta: float = 0.005
    """Step of the adaptive entropy coefficient (with ``use_adaptive_entropy``)."""
    entropy_target: float = 0.2
    """Target entropy of adaptive entropy control (with ``use_adaptive_entropy``)."""
    max_tool_calling_iterations: int | None = None
    """Tool-calling turns of an agent (with tools, which the command line does not take)."""
    vllm_importance_sampling_correction: bool = True
    """Correct for vLLM's sampling log-probs (with ``use_vllm``)."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """How the vLLM correction is applied (with ``use_vllm``)."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound of the vLLM correction (with ``use_vllm``)."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound of the vLLM correction (with ``use_vllm``)."""
    vllm_importance_sampling_cap: float | None = None
    """TRL's deprecated name of ``vllm_importance_sampling_clip_max`` (with ``use_vllm``)."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556, eq. 9, the delta): a sequence with a
    negative advantage whose mean per-token KL from the sampling policy exceeds it leaves the policy loss
    (e.g. 0.5); unset: off."""
    log_completions_hub_repo: str | None = None
    """A hub data set to upload logged completions to (needs a hub account: docs/trl.md)."""


@dataclass
class ReferenceModelFields:
    """The reference model of the methods that take TRL's ``ref_model`` (DPO, KTO, Online DPO, PPO)."""

    ref_model_name_or_path: str | None = None
    """The reference model (TRL's ``ref_model`` argument), when it is not the initial policy (e.g. the first
    round's start in iterative DPO). Unset: a frozen copy of the policy, or with ``use_peft`` the policy with its
    adapters disabled."""


@dataclass
class PreferenceTrlFields:
    """TRL ``DPOConfig`` fields and ``ORPOConfig`` / ``CPOConfig`` fields (``alignlab dpo --loss_type orpo|cpo|
    simpo``) that the alignlab config declares nowhere else."""

    precompute_ref_batch_size: int | None = None
    """Batch size of the reference log-prob precomputation (unset: ``per_device_eval_batch_size``)."""
    ld_alpha: float | None = None
    """LD-DPO (arXiv 2409.06411): each pair's tokens past the shorter completion's length count this much in the
    sequence log-probs, of the policy and the reference, in [0, 1] (unset: fully, plain DPO)."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO's divergence (arXiv 2309.16240): reverse_kl (DPO's own), forward_kl, js_divergence or
    alpha_divergence; the loss reads ``f'(pi / pi_ref)`` instead of the log-ratio (loss types sigmoid,
    sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft, as TRL)."""
    f_alpha_divergence_coef: float = 0.5
    """f-DPO's alpha (with ``f_divergence_type`` alpha_divergence)."""
    use_weighting: bool = False
    """WPO's pair weighting (not implemented: docs/trl.md)."""
    sync_ref_model: bool = False
    """TR-DPO: every ``ref_model_sync_steps`` steps the reference model moves to ``ref_model_mixup_alpha *
    policy + (1 - ref_model_mixup_alpha) * reference`` (needs a separate reference model)."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO's mixing weight (with ``sync_ref_model``)."""
    ref_model_sync_steps: int = 512
    """TR-DPO's update period (with ``sync_ref_model``)."""
    max_completion_length: int | None = None
    """ORPO's and CPO's cap on completion tokens: each completion keeps its first this many tokens, before
    ``max_length`` caps prompt+completion (unset: no cap)."""
    generate_during_eval: bool = False
    """Sample and log completions at evaluation (not implemented: docs/trl.md)."""
    is_encoder_decoder: bool | None = None
    """Whether the model is an encoder-decoder (unset: from the model). alignlab trains decoder-only models."""
    padding_value: int | None = None
    """Token id the batches are padded with (unset: the tokenizer's pad id); padding is masked."""


@dataclass
class KTOTrlFields:
    """TRL ``KTOConfig`` fields the alignlab config declares nowhere else."""

    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto; or apo_zero_unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7 unpaired, as TRL): the KTO
    losses with the reference point ``z0`` at 0, so no mismatched-pair forward passes."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs of every example and of its mismatched pair once before training, and free
    the reference model (the mismatched completions are then fixed per block of ``per_device_train_batch_size``
    rows in data order, as TRL's)."""
    precompute_ref_batch_size: int | None = None
    """Batch size of the precomputation (with ``precompute_ref_log_probs``)."""
    sync_ref_model: bool = False
    """TR-DPO reference updates, as ``alignlab dpo``'s ``sync_ref_model``."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO's mixing weight (with ``sync_ref_model``)."""
    ref_model_sync_steps: int = 512
    """TR-DPO's update period (with ``sync_ref_model``)."""
