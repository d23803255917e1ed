"""Settings every training command shares. Names and defaults follow transformers' ``TrainingArguments`` and
TRL's ``ModelConfig`` unless a field's docstring says otherwise, so users' flags carry over."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from alignlab.errors import UserError


def fast_bf16_available() -> bool:
    """Whether bf16 matrix products run natively here: a CUDA GPU that supports bf16, or a CPU with AMX tiles
    or AVX512-BF16 (``torch.cpu`` capability checks). Without them, CPU bf16 matmuls are emulated (measured
    here on an AVX2-only CPU: 1024x1024 products 67x slower than float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_bf16(value: bool | None) -> bool:
    """``value``, or :func:`fast_bf16_available` when unset."""
    return fast_bf16_available() if value is None else bool(value)


@dataclass
class TrainConfig:
    """Model, data, optimisation, precision, LoRA, logging and checkpointing settings."""

    # --- model -----------------------------------------------------------------------------------------
    model_name_or_path: str | None = None
    """Hugging Face model id or local directory; unset: the embedded SmolLM2-135M-Instruct."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint. Off unless you ask: it runs code from the checkpoint."""
    use_kernels: bool = False
    """Let transformers replace layers with Hugging Face hub kernels (downloaded from the hub). Off unless you
    ask, so that loading never needs the network (transformers 5 turns them on by default on CUDA)."""

    # --- data ------------------------------------------------------------------------------------------
    dataset_name: str | None = None
    """Training data: ``builtin:NAME``, a local .jsonl/.jsonl.gz/.json/.parquet/.csv file, a saved dataset
    directory, or a Hugging Face dataset id."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    dataset_train_split: str = "train"
    """Split of ``dataset_name`` to train on (hub datasets and saved DatasetDicts)."""
    eval_dataset_name: str | None = None
    """Separate evaluation data, same forms as ``dataset_name``."""
    dataset_test_split: str = "test"
    """Split of ``eval_dataset_name`` to evaluate on (hub datasets and saved DatasetDicts)."""
    eval_split_size: float = 0.0
    """Hold out this part of the training data for evaluation: a fraction in (0, 1) or a row count >= 1.
    Ignored when ``eval_dataset_name`` is given. The split is random with ``seed``."""

    # --- output ----------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the model, tokenizer, ``metrics.jsonl``, ``config.yaml``, ``plots/`` and checkpoints go. Required."""

    # --- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = 5e-5
    """Peak AdamW learning rate."""
    per_device_train_batch_size: int = 8
    """Training examples per process per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Evaluation examples per process per batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed into one optimizer step."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); ignored when ``max_steps`` > 0."""
    max_steps: int = -1
    """Optimizer steps to run; overrides ``num_train_epochs`` when > 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up (transformers' ``get_scheduler``)."""
    warmup_steps: int = 0
    """Linear warm-up steps; overrides ``warmup_ratio`` when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the total steps."""
    seed: int = 42
    """Seed for initialisation, data order, the eval split and sampling."""

    # --- precision and memory --------------------------------------------------------------------------
    bf16: bool | None = None
    """bfloat16 autocast with float32 master weights. Unset: on where bf16 matrix products are fast (a CUDA GPU
    with bf16, a CPU with AMX or AVX512-BF16: several times faster than float32 there), off elsewhere (a CPU
    without them emulates bf16, tens of times slower than float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory at ~30% more compute. Off by default
    (TRL turns it on): models of the size trained on CPU fit without it."""
    cpu_kernels: Literal["auto", "reuse_memory", "off"] = "auto"
    """The CPU speed layer (:mod:`alignlab.ops.cpu_kernels`): auto turns on oneDNN linear layers for float32
    training forwards and for decoding where they apply (measured faster on the CPUs benchmarked:
    benchmarks/README.md); reuse_memory also keeps freed memory for reuse between steps, with huge pages (a few
    percent faster per online step, but resident memory grows over long runs whose batch shapes vary); off runs
    plain PyTorch. No effect on GPU computations."""

    # --- LoRA (peft) -----------------------------------------------------------------------------------
    use_peft: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    """Module names to adapt; unset: every linear layer except the output head (peft's ``all-linear``)."""
    merge_lora: bool = False
    """Save the merged full model instead of the adapter."""

    # --- logging, evaluation, checkpoints --------------------------------------------------------------
    logging_steps: int = 10
    """Write a row to ``metrics.jsonl`` every this many optimizer steps (and at the last step)."""
    report_to: list[str] | None = None
    """Experiment trackers that also get every ``metrics.jsonl`` row (TRL's flag, through accelerate):
    tensorboard, wandb, trackio, ... several at once, or none (the default). Local trackers write under
    ``output_dir/runs`` (wandb under ``output_dir/wandb``; ``WANDB_MODE=offline`` needs no network)."""
    eval_steps: int | None = None
    """Evaluate every this many steps; evaluation also runs once at the end whenever an eval set is given."""
    save_steps: int = 500
    """Write ``checkpoint-N/`` every this many steps (0: only the final model)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed first)."""
    resume_from_checkpoint: str | None = None
    """A ``checkpoint-N`` directory to resume from, or ``true`` for the latest one in ``output_dir``."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (TRL's default for preference training)."""
    dataloader_num_workers: int = 0
    """Worker processes for data loading."""

    # --- several processes (FSDP2) ---------------------------------------------------------------------
    fsdp: str = ""
    """Shard the trained model's parameters, gradients and optimizer state across processes with PyTorch
    FSDP2 (TrainingArguments' flag): ``full_shard``, ``shard_grad_op`` (parameters stay gathered between
    forward and backward), optionally with ``auto_wrap`` and ``offload``, space-separated; empty: DDP
    (``torchrun``) or one process. ``accelerate launch`` with an FSDP config needs no flag. docs/distributed.md."""
    fsdp_config: str | None = None
    """FSDP settings: a JSON or YAML file, a JSON string, or (Python) a dict, with transformers' keys:
    ``min_num_params``, ``transformer_layer_cls_to_wrap``, ``reshard_after_forward``, ``offload_params``,
    ``activation_checkpointing``, ``cpu_ram_efficient_loading``, ``state_dict_type``."""

    # --- faults ----------------------------------------------------------------------------------------
    max_nonfinite_steps: int = 10
    """An optimizer update whose loss or gradient norm is NaN or infinite is skipped (no optimizer step, its
    gradients dropped) and counted (``nonfinite_steps`` in ``metrics.jsonl``); more than this many skipped
    updates stop the run with a one-line error, the checkpoints written so far kept (0: stop at the first).
    alignlab's own flag: transformers and TRL have none (docs/faults.md)."""

    def __post_init__(self) -> None:
        self.bf16 = resolve_bf16(self.bf16)
        positive_ints = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "lora_r",
            "lora_alpha",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_nonfinite_steps < 0:
            raise UserError(f"--max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        for name in ("eval_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        nonneg = ("weight_decay", "max_grad_norm", "warmup_steps", "save_steps", "eval_split_size")
        for name in nonneg:
            value = getattr(self, name)
            if value < 0 or (isinstance(value, float) and math.isnan(value)):
                raise UserError(f"--{name} must be >= 0, got {value}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max_steps must be > 0 (or -1 to use --num_train_epochs), got {self.max_steps}")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.eval_split_size >= 1 and self.eval_split_size != int(self.eval_split_size):
            raise UserError(f"--eval_split_size must be a fraction in (0, 1) or a whole count, got {self.eval_split_size}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise UserError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        if not self.dataset_name:
            raise UserError("--dataset_name is required")
        from alignlab.train.distributed import load_fsdp_config, parse_fsdp_flag

        parse_fsdp_flag(self.fsdp)
        load_fsdp_config(self.fsdp_config)
        if self.fsdp_config and not self.fsdp:
            raise UserError("--fsdp_config needs --fsdp (e.g. --fsdp full_shard)")
        from alignlab.train.tracking import resolve_report_to

        self.report_to = resolve_report_to(self.report_to)


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (used for ``--help``)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs

