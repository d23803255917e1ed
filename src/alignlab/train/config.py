"""Settings every training command shares. Names and defaults follow transformers' ``TrainingArguments`` and
TRL's ``ModelConfig`` unless a field's docstring says otherwise, so users' flags carry over."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from alignlab.errors import UserError
from alignlab.train.trl_args import ModelArgumentsFields, TrainingArgumentsFields, TrlCommonFields


def fast_bf16_available() -> bool:
    """Whether bf16 matrix products run natively here: a CUDA GPU that supports bf16, or a CPU with AMX tiles
    or AVX512-BF16 (``torch.cpu`` capability checks). Without them, CPU bf16 matmuls are emulated (measured
    here on an AVX2-only CPU: 1024x1024 products 67x slower than float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def auto_to_none(config: Any) -> None:
    """Read the value "auto" of every ``bool | None`` field of a config dataclass as ``None`` (unset: decide for
    me), as the command line and YAML do (``bf16="auto"``, ``gradient_checkpointing="auto"``)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and value.lower() == "auto" and str(f.type).replace(" ", "") == "bool|None":
            setattr(config, f.name, None)


def resolve_bf16(value: bool | None) -> bool:
    """``value``, or :func:`fast_bf16_available` when unset."""
    return fast_bf16_available() if value is None else bool(value)


@dataclass(frozen=True)
class Range:
    """The values a numeric flag may take: bounds ``ge`` / ``gt`` (lower) and ``le`` / ``lt`` (upper), any of them
    unset, plus the odd values in ``also`` allowed besides (``max_steps``' ``-1``); ``why`` is added to the error
    in parentheses. Declared in a config class's ``RANGES`` or in :data:`FIELD_RANGES` and checked by
    :func:`check_ranges`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()
    why: str = ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` is allowed."""
        if value in self.also:
            return True
        return not ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                    or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt))

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ... as the error says it."""
        low = (f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None
               else None)
        high = (f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None
                else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1]}" if high else "a number"

    def error(self, name: str, value: Any) -> str:
        """The one-line message for ``--name value`` out of range."""
        return f"--{name} must be {self.describe()}" + (f" ({self.why})" if self.why else "") + f", got {value}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


FIELD_RANGES: dict[str, Range] = {
    "num_generations": Range(ge=2, why="a group of one completion is its own baseline: every advantage would be 0"),
    "seed": Range(ge=0, le=2**32 - 1),
    "temperature": Range(gt=0),
    "top_p": Range(gt=0, le=1),
    "learning_rate": Range(gt=0),
    "per_device_train_batch_size": Range(ge=1),
    "per_device_eval_batch_size": Range(ge=1),
    "gradient_accumulation_steps": Range(ge=1),
    "samples_per_prompt": Range(ge=1),
    "num_return_sequences": Range(ge=1),
    "num_prompts": Range(ge=1),
    "max_new_tokens": Range(ge=1),
    "max_prompt_length": Range(ge=1),
    "max_length": Range(ge=1),
    "generation_batch_size": Range(ge=1),
}
"""Rules by field name for every command's config (training or not), for the names that mean the same thing
wherever they appear; a class's own ``RANGES`` entry for a name wins over these."""


def _numbers(value: Any) -> list[float]:
    """The numbers in a flag's value: itself, or the entries of a list (``--reward_weights``); bools are not
    numbers here."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, numbers.Real) and not isinstance(v, bool)]


def class_ranges(cls: type) -> dict[str, Range]:
    """The rules that apply to ``cls``'s fields: :data:`FIELD_RANGES`, then every ``RANGES`` of its classes from
    the base down (a subclass's entry wins)."""
    rules = dict(FIELD_RANGES)
    for klass in reversed(cls.__mro__):
        rules.update(vars(klass).get("RANGES", {}))
    return rules


def check_ranges(config: Any, values: dict[str, Any] | None = None) -> None:
    """Check every numeric field of a config dataclass against its rule, before any other check or any work.

    For every field holding a number (or a list of numbers): a float must be finite (NaN and infinities make no
    setting meaningful); a field with a rule (:func:`class_ranges`) must satisfy it; an integer field without
    one must not be negative (every such field is a count). ``None`` means unset and is not checked.

    Args:
        config: a config instance, or a config class together with ``values``.
        values: field values to check instead of the instance's (the command line checks what it parsed
            before building the config).

    Raises:
        UserError: one line, ``--name must be ..., got value``, for the first field out of range.
    """
    cls = config if isinstance(config, type) else type(config)
    rules = class_ranges(cls)
    for f in dataclasses.fields(cls):
        value = values.get(f.name) if values is not None else getattr(config, f.name, None)
        if value is None:
            continue
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
            rule = rules.get(f.name)
            if rule is None and isinstance(number, int):
                rule = Range(ge=0)
            if rule is not None and not rule.holds(number):
                raise UserError(rule.error(f.name, value))


@dataclass
class TrainConfig(TrlCommonFields, ModelArgumentsFields, TrainingArgumentsFields):
    """Model, data, optimisation, precision, LoRA, logging and checkpointing settings. Every field of transformers'
    ``TrainingArguments`` and TRL's ``ModelConfig`` is accepted with its name and default
    (:mod:`alignlab.train.trl_args`); those documented below are the ones alignlab describes itself."""

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
    """Split to evaluate on (hub datasets and saved DatasetDicts): of ``eval_dataset_name`` when given, else, with
    an ``eval_strategy`` other than "no" and no ``eval_split_size``, of ``dataset_name`` (as TRL's scripts)."""
    eval_split_size: float = 0.0
    """Hold out this part of the training data for evaluation: a fraction in (0, 1) or a row count >= 1.
    Ignored when ``eval_dataset_name`` is given. The split is random with ``seed``."""

    # --- output ----------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where the model, tokenizer, ``metrics.jsonl``, ``config.yaml``, ``plots/`` and checkpoints go. Required."""
    overwrite_output_dir: bool = False
    """Allow a new run in an ``output_dir`` that holds an earlier run (a trained model, checkpoints or
    ``metrics.jsonl``). The earlier files stay untouched until the new run saves its model, then are replaced;
    a new run that fails leaves them as they were (docs/faults.md). Without it such a folder is refused."""

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
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warm-up: any of transformers' ``SchedulerType`` names (linear, cosine,
    cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr,
    cosine_warmup_with_min_lr, warmup_stable_decay, ...), built by ``transformers.get_scheduler`` with
    ``lr_scheduler_kwargs``."""
    warmup_steps: float = 0
    """Linear warm-up steps, or a ratio of the total steps when below 1; overrides ``warmup_ratio`` when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the total steps."""
    seed: int = 42
    """Seed for initialisation, data order, the eval split and sampling."""

    # --- precision and memory --------------------------------------------------------------------------
    bf16: bool | None = None
    """bfloat16 autocast with float32 master weights. Unset: on where bf16 matrix products are fast (a CUDA GPU
    with bf16, a CPU with AMX or AVX512-BF16: several times faster than float32 there), off elsewhere (a CPU
    without them emulates bf16, tens of times slower than float32)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory at ~30% more compute. Unset ("auto"): on when
    the estimated activations of the largest micro-batch exceed half the memory available (host RAM on CPU, free
    GPU memory), off otherwise, decided before training and logged (:mod:`alignlab.train.checkpointing`)."""
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
    logging_steps: float = 10
    """Write a row to ``metrics.jsonl`` every this many optimizer steps (and at the last step) with
    ``logging_strategy`` steps; a value below 1 is a ratio of the total steps."""
    report_to: list[str] | None = "none"
    """Experiment trackers that also get every ``metrics.jsonl`` row (TRL's flag, through accelerate):
    tensorboard, wandb, trackio, ... several at once, or none (the default). Local trackers write under
    ``output_dir/runs`` (wandb under ``output_dir/wandb``; ``WANDB_MODE=offline`` needs no network)."""
    eval_steps: float | None = None
    """Evaluate every this many steps (a ratio of the total steps when below 1) with ``eval_strategy`` steps,
    or alone (then it implies steps); evaluation also runs once at the end whenever an eval set is given."""
    save_steps: float = 500
    """Write ``checkpoint-N/`` every this many steps (a ratio of the total steps when below 1) with
    ``save_strategy`` steps (0: only the final model)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed first)."""
    resume_from_checkpoint: str | None = None
    """A ``checkpoint-N`` directory to resume from, or ``true`` for the latest one in ``output_dir``."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (TRL's default for preference training)."""
    dataloader_num_workers: int = 0
    """Worker processes for data loading."""

    # --- several processes (FSDP2) ---------------------------------------------------------------------
    fsdp: str | None = None
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
    reward_timeout: float = 300.0
    """Seconds a reward function may take for one call (commands that call reward functions); past them the
    run stops with a one-line error naming the function. alignlab's own flag (docs/faults.md)."""
    stop_grace_period: float = 300.0
    """After the first SIGTERM or SIGINT the run stops at the end of the step under way; a step that has not
    ended this many seconds later is cut short (as a second signal does), the checkpoints written so far kept.
    0: stop at once on the first signal. alignlab's own flag (docs/faults.md)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "logging_steps": Range(gt=0),
        "save_steps": Range(ge=0),
        "warmup_steps": Range(ge=0),
        "local_rank": Range(ge=-1),
        "eval_delay": Range(ge=0),
        "lora_r": Range(ge=1),
        "lora_alpha": Range(ge=1),
        "eval_steps": Range(gt=0),
        "save_total_limit": Range(ge=1),
        "max_steps": Range(ge=1, also=(-1,), why="or -1 to use --num_train_epochs"),
        "num_train_epochs": Range(ge=0),
        "warmup_ratio": Range(ge=0, lt=1),
        "lora_dropout": Range(ge=0, lt=1),
        "adam_beta1": Range(ge=0, lt=1),
        "adam_beta2": Range(ge=0, lt=1),
        "adam_epsilon": Range(gt=0),
        "weight_decay": Range(ge=0),
        "max_grad_norm": Range(ge=0),
        "eval_split_size": Range(ge=0),
        "reward_timeout": Range(gt=0),
        "stop_grace_period": Range(ge=0),
    }
    """This class's numeric rules (:class:`Range`), checked by :func:`check_ranges` before anything else in
    ``__post_init__``; a subclass declares its own ``RANGES`` (merged with these, its own winning)."""

    def __post_init__(self) -> None:
        from alignlab.train.schedule import check_steps
        from alignlab.train.trl_args import check_trl_args

        check_ranges(self)
        for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
            check_steps(name, getattr(self, name))
        auto_to_none(self)
        check_trl_args(self)
        self.bf16 = resolve_bf16(self.bf16)
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.eval_split_size >= 1 and self.eval_split_size != int(self.eval_split_size):
            raise UserError(f"--eval_split_size must be a fraction in (0, 1) or a whole count, got {self.eval_split_size}")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        from alignlab.train.distributed import load_fsdp_config, parse_fsdp_flag

        parse_fsdp_flag(self.fsdp)
        load_fsdp_config(self.fsdp_config)
        if self.fsdp_config and not self.fsdp:
            raise UserError("--fsdp_config needs --fsdp (e.g. --fsdp full_shard)")
        from alignlab.train.tracking import resolve_report_to

        self.report_to = resolve_report_to(self.report_to)

    def check_inputs(self) -> None:
        """The checks that need to know what the trainer was given besides the config (a data set object in
        Python is as good as ``--dataset_name``); the trainer calls it once it has its inputs.

        Raises:
            UserError: no training data at all.
        """
        if not self.dataset_name:
            raise UserError("--dataset_name is required")


@functools.lru_cache(maxsize=None)
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

