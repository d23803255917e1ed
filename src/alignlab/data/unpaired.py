"""KTO's data: unpaired ``{prompt, completion, label}`` rows, or preference pairs split into such rows.

Formats (detected from the first row, as TRL's ``KTOTrainer._prepare_dataset``):

* **unpaired** ``{"prompt", "completion", "label"}``: ``label`` true for a desirable completion, false for an
  undesirable one (``true``/``false`` or 1/0); text or ``{role, content}`` message lists;
* **preference pairs**, any format :mod:`alignlab.data.preference` reads (explicit or implicit prompt,
  conversational): every chosen completion becomes a desirable row and every rejected one an undesirable row
  (:func:`split_pairs_for_kto`, TRL's ``unpair_preference_dataset``).

Tokenization follows TRL 1.16's ``KTOTrainer``: EOS appended to plain-text completions; prompt and
prompt+completion tokenized whole, the completion starting where they stop sharing tokens
(``common_prefix_length``); rows whose prompt alone fills ``max_length`` dropped; truncation to ``max_length``
(the end cut) when batches are collated. The KL reference point's mismatched pairs are built per batch by
:func:`collate_unpaired`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from alignlab.data.preference import check_text, common_prefix_length, parse_pair, tokenize_text
from alignlab.data.sequences import build_sequences
from alignlab.errors import DataError

T = TypeVar("T")


@dataclass
class UnpairedStats:
    """What happened to the rows of a data set on the way to KTO examples."""

    rows: int = 0
    from_pairs: bool = False
    desirable: int = 0
    undesirable: int = 0
    dropped_too_long: int = 0

    def describe(self) -> str:
        source = f"{self.rows} preference pairs split" if self.from_pairs else f"{self.rows} unpaired rows"
        return (f"{source} -> {self.desirable} desirable and {self.undesirable} undesirable completions "
                f"({self.dropped_too_long} dropped: the prompt alone fills max_length)")


def _label(value: Any, location: str, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{location}: field {column!r} must be true or false (1 or 0), got {value!r}")


def mismatched_completions(completions: Sequence[T]) -> list[T]:
    """The batch's completions rotated by one: ``[y_n, y_1, ..., y_{n-1}]``, to pair with ``[x_1, ..., x_n]``.

    Pairing prompt ``x_i`` with completion ``y_{i-1}`` gives the mismatched pairs whose log-ratios estimate
    the KL reference point; the set of completions is the batch's own, as the KTO paper asks. TRL
    (``KTOTrainer._prepare_dataset``, ``add_kl_completion_ids``) does the same within each block of
    ``per_device_train_batch_size`` rows.

    Raises:
        ValueError: fewer than 2 completions (TRL rejects batch size 1: the pair would be matched).
    """
    if len(completions) < 2:
        raise ValueError(f"KTO's KL estimate needs a batch of at least 2 examples, got {len(completions)}")
    return [completions[-1], *completions[:-1]]


def split_pairs_for_kto(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs -> unpaired KTO rows: every chosen completion desirable, every rejected one not.

    ``{"prompt", "chosen", "rejected", **extra}`` becomes ``{"prompt", "completion": chosen, "label": True,
    **extra}`` and ``{"prompt", "completion": rejected, "label": False, **extra}``; all chosen rows first, then
    all rejected rows, each in input order (TRL's ``unpair_preference_dataset`` on one map batch). Rows
    without ``"prompt"`` (implicit prompt) stay without one. Values are passed through untouched.

    Raises:
        DataError: a row lacks ``"chosen"`` or ``"rejected"`` (the message names the row index).
    """
    for i, row in enumerate(rows):
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise DataError(f"preference row {i}: no {' or '.join(repr(k) for k in missing)} field to unpair for KTO")

    def unpaired(row: Mapping[str, Any], key: str, label: bool) -> dict[str, Any]:
        out = {"prompt": row["prompt"]} if "prompt" in row else {}
        out["completion"] = row[key]
        out["label"] = label
        out.update({k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")})
        return out

    return [unpaired(row, "chosen", True) for row in rows] + [unpaired(row, "rejected", False) for row in rows]


def unpaired_rows(rows: list[tuple[str, dict]], *, prompt_column: str = "prompt", completion_column: str = "completion",
                  label_column: str = "label", chosen_column: str = "chosen",
                  rejected_column: str = "rejected") -> tuple[list[dict[str, Any]], bool]:
    """Raw rows -> ``[{"prompt", "completion", "label", "location"}]`` (checked), and whether they were pairs.

    Raises:
        DataError: a missing, null or empty field, a label that is not a boolean, text mixed with messages (the
            message names the file and line or row).
    """
    if not rows:
        return [], False
    first = rows[0][1]
    if chosen_column in first and rejected_column in first:
        pairs = []
        for location, row in rows:
            pair = parse_pair(row, location, prompt_column=prompt_column, chosen_column=chosen_column,
                              rejected_column=rejected_column)
            pairs.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                          "location": location})
        return split_pairs_for_kto(pairs), True
    out = []
    for location, row in rows:
        for column in (prompt_column, completion_column, label_column):
            if column not in row:
                raise DataError(f"{location}: missing field {column!r} (unpaired rows need {prompt_column!r}, "
                                f"{completion_column!r} and {label_column!r}, or give chosen/rejected pairs)")
        prompt = check_text(row[prompt_column], prompt_column, location)
        completion = check_text(row[completion_column], completion_column, location)
        if isinstance(prompt, str) and isinstance(completion, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) != isinstance(completion, list):
            raise DataError(f"{location}: the prompt is a message list but the completion is plain text")
        out.append({"prompt": prompt, "completion": completion, "label": _label(row[label_column], location, label_column),
                    "location": location})
    return out, False


def tokenize_unpaired(row: dict[str, Any], tokenizer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of one unpaired row, as TRL's ``KTOTrainer`` tokenizes it.

    Raises:
        DataError: the chat template fails on the row, or the prompt tokenizes to nothing.
    """
    prompt, completion = row["prompt"], row["completion"]
    try:
        if isinstance(completion, list):
            prompt_ids = tokenize_text(tokenizer, prompt, add_generation_prompt=True)
            full = tokenize_text(tokenizer, prompt + completion)
        else:
            eos = tokenizer.eos_token
            prompt_ids = tokenize_text(tokenizer, prompt)
            full = tokenize_text(tokenizer, prompt + (completion if completion.endswith(eos) else completion + eos))
    except Exception as exc:  # a chat template raising on odd roles, say
        raise DataError(f"{row['location']}: cannot tokenize: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    n = common_prefix_length(prompt_ids, full)
    if n == 0:
        raise DataError(f"{row['location']}: the prompt tokenizes to no tokens")
    return full[:n], full[n:]


def build_unpaired_examples(rows: list[tuple[str, dict]], tokenizer, *, max_length: int | None,
                            **columns: str) -> tuple[list[dict[str, Any]], UnpairedStats]:
    """Rows (unpaired or pairs) -> KTO examples ``{"prompt_ids", "completion_ids", "label", "index"}``.

    ``index`` is the example's position in the (unpaired) data: :func:`collate_unpaired` restores this order
    within a batch before it rotates the completions. ``columns``: ``prompt_column``, ``completion_column``,
    ``label_column``, ``chosen_column``, ``rejected_column``.

    Raises:
        DataError: on the first bad row (see :func:`unpaired_rows`).
    """
    unpaired, from_pairs = unpaired_rows(rows, **columns)
    stats = UnpairedStats(rows=len(rows), from_pairs=from_pairs)
    examples = []
    for row in unpaired:
        prompt_ids, completion_ids = tokenize_unpaired(row, tokenizer)
        if max_length is not None and len(prompt_ids) >= max_length:
            stats.dropped_too_long += 1
            continue
        examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": row["label"],
                         "index": len(examples)})
        if row["label"]:
            stats.desirable += 1
        else:
            stats.undesirable += 1
    return examples, stats


def fix_mismatched_completions(examples: list[dict[str, Any]], block: int) -> None:
    """Store each example's mismatched completion (``KL_completion_ids``) once, as TRL's ``_prepare_dataset``
    does: in data order (``index``), blocks of ``block`` consecutive examples, completions rotated by one within
    a block (:func:`mismatched_completions`; a block of one keeps its own). :func:`collate_unpaired` then uses
    them whatever the batch, so that reference log-probs of the mismatched pairs can be computed in advance."""
    ordered = sorted(examples, key=lambda e: e["index"])
    for start in range(0, len(ordered), block):
        part = ordered[start : start + block]
        completions = [e["completion_ids"] for e in part]
        shifted = mismatched_completions(completions) if len(completions) > 1 else completions
        for example, other in zip(part, shifted):
            example["KL_completion_ids"] = other


def collate_unpaired(examples: list[dict[str, Any]], pad_token_id: int, *,
                     max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of KTO examples and its mismatched pairs for the KL reference point, right-padded to one width.

    The examples are put back in data order (``index``), then prompt ``i`` is paired with completion ``i - 1``
    (:func:`mismatched_completions`): TRL's ``KL_completion_ids`` when a batch is one of its
    blocks of ``per_device_train_batch_size`` consecutive rows. A batch of one example (the end of an epoch) is
    paired with itself, as TRL's last block of one row is. Examples that carry ``KL_completion_ids``
    (:func:`fix_mismatched_completions`) are paired with those instead, and precomputed ``ref_logps`` /
    ``ref_KL_logps`` travel as ``(B,)`` float tensors. Each sequence is cut to ``max_length`` (its end), as
    TRL's collator does.

    Returns:
        ``input_ids``, ``attention_mask``, ``completion_mask`` ``(B, T)`` of the matched sequences and
        ``KL_input_ids``, ``KL_attention_mask``, ``KL_completion_mask`` ``(B, T)`` of the mismatched ones (long);
        ``label`` ``(B,)`` bool.
    """
    examples = sorted(examples, key=lambda e: e["index"])
    completions = [e["completion_ids"] for e in examples]
    if "KL_completion_ids" in examples[0]:
        shifted = [e["KL_completion_ids"] for e in examples]
    else:
        shifted = mismatched_completions(completions) if len(completions) > 1 else completions
    prompts = [e["prompt_ids"] for e in examples] * 2
    answers = completions + shifted
    if max_length is not None:  # every prompt is shorter than max_length (longer ones were dropped)
        answers = [a[: max(0, max_length - len(p))] for p, a in zip(prompts, answers)]
    rows = build_sequences(prompts, answers, pad_token_id)
    n = len(examples)
    batch = {}
    for prefix, part in (("", slice(0, n)), ("KL_", slice(n, 2 * n))):
        batch.update({prefix + key: rows[key][part] for key in ("input_ids", "attention_mask", "completion_mask")})
    batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    for key in ("ref_logps", "ref_KL_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch
