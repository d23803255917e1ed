"""``README.md`` beside a saved model: a Hugging Face model card saying what the model is and how it was made.

The card has the Hub's YAML front matter (built with ``huggingface_hub.ModelCardData``, so it parses back with
``ModelCard.load``) and a body: what the model is, how it was trained (method, base model, data,
hyperparameters, final metrics, the exact command line, the alignlab version) and how to load it. TRL writes
the same kind of card (``trl.trainer.utils.generate_model_card``, tags ``trl`` + the trainer's name); alignlab
writes it without a template engine and without network.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import alignlab

# Methods whose saved model is a sequence classifier with one score (a reward model), not a causal LM.
SCORE_METHODS = {"reward"}

# A Hub repository id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`), not a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hub id for the YAML metadata (a local path or data file cannot)."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists() and not name.endswith(
        (".json", ".jsonl", ".csv", ".parquet", ".txt")
    )


def _cell(value: Any) -> str:
    """One Markdown table cell: floats with 6 significant digits, ``|`` and newlines escaped."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        text = f"{float(value):.6g}" if math.isfinite(value) else str(float(value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows: Mapping[str, Any]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _fence(text: str, lang: str = "") -> str:
    """``text`` in a fenced code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _how_to_load(method: str, peft: bool) -> str:
    if peft:
        auto = "AutoPeftModelForSequenceClassification" if method in SCORE_METHODS else "AutoPeftModelForCausalLM"
        code = (
            f"from peft import {auto}\n"
            "from transformers import AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
            "model = model.merge_and_unload()  # optional: one plain transformers model, no adapter"
        )
        intro = "The folder holds a LoRA adapter (PEFT) on the base model; PEFT loads the base model and the adapter:"
    elif method in SCORE_METHODS:
        code = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
            'score = model(**tokenizer("text to score", return_tensors="pt")).logits[0, 0]'
        )
        intro = "A reward model: one score per text, read at the last token."
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
        )
        intro = "A causal language model:"
    usage = ""
    if method not in SCORE_METHODS:
        generate = _fence("alignlab generate --model_name_or_path path/to/this/folder", "bash")
        usage = f"\n\nOr sample from it with alignlab:\n\n{generate}"
    return f"{intro}\n\n{_fence(code, 'python')}{usage}"


def build_model_card(
    *,
    base_model: str,
    method: str,
    datasets: Iterable[str],
    hyperparameters: Mapping[str, Any],
    final_metrics: Mapping[str, Any],
    command_line: str,
    peft: bool,
    model_name: str | None = None,
):
    """The ``huggingface_hub.ModelCard`` that :func:`write_model_card` saves (same arguments).

    Hub metadata: ``base_model`` and ``datasets`` only where they are Hub ids (local paths are named in the body
    only), ``library_name`` ``peft`` or ``transformers``, ``pipeline_tag`` ``text-generation`` (or
    ``text-classification`` for a reward model), ``tags`` ``alignlab``, ``trl``, the method.
    """
    from huggingface_hub import ModelCard, ModelCardData

    datasets = [str(d) for d in datasets]
    hub_datasets = [d for d in datasets if _hub_id(d)]
    data = ModelCardData(
        base_model=base_model if _hub_id(base_model) else None,
        datasets=hub_datasets or None,
        library_name="peft" if peft else "transformers",
        pipeline_tag="text-classification" if method in SCORE_METHODS else "text-generation",
        model_name=model_name,
        tags=["alignlab", "trl", method] + (["lora"] if peft else []),
    )
    title = model_name or f"{method} of {Path(base_model).name or base_model}"
    kind = "a LoRA adapter for" if peft else "a fine-tune of"
    data_lines = "\n".join(f"- `{_cell(d)}`" for d in datasets) or "- (none named)"
    metrics = _table(("metric", "value"), final_metrics) if final_metrics else "No metrics were logged."
    body = f"""
# {title}

This model is {kind} `{base_model}`, trained with **{method}** by
alignlab {alignlab.__version__}, a library that aligns causal language models with human preferences (SFT,
reward models, PPO, GRPO, DPO and its variants) with TRL's names and formulas.

## Training

- Method: `{method}`
- Base model: `{base_model}`
- Fine-tuning: {"LoRA adapter (PEFT)" if peft else "all weights"}
- alignlab version: {alignlab.__version__}

### Data

{data_lines}

### Hyperparameters

{_table(("name", "value"), hyperparameters)}

### Final metrics

{metrics}

### Command line

{_fence(command_line, "bash")}

## How to load it

{_how_to_load(method, peft)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(output_dir: str | os.PathLike, **fields: Any) -> Path:
    """Write ``output_dir/README.md``, the model card of the model saved there, atomically.

    Args:
        output_dir: the folder holding the saved model (created if missing).
        fields: the keyword arguments of :func:`build_model_card`: ``base_model`` (the model training started
            from, Hub id or local path), ``method`` (e.g. ``dpo``), ``datasets`` (the training data as the user
            named it), ``hyperparameters`` (name -> value), ``final_metrics`` (TRL metric names -> number),
            ``command_line`` (the exact command), ``peft`` (a LoRA adapter rather than full weights) and
            optionally ``model_name`` (the card's title; default ``<method> of <base model name>``).

    Returns:
        The path of ``README.md``. The card is written to a temporary file in ``output_dir`` and moved into place
        with ``os.replace``, so a crash leaves the old card or the new one, never half of one.

    Raises:
        TypeError: a missing or unknown field.
    """
    card = build_model_card(**fields)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    fd, tmp = tempfile.mkstemp(prefix=".README.md.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(card.content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
