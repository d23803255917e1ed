"""Preference pairs: the three formats users bring, tokenization, truncation and collation.

Formats (detected per row):

* **explicit prompt** ``{"prompt", "chosen", "rejected"}`` with strings;
* **implicit prompt** ``{"chosen", "rejected"}``: two full transcripts sharing a prefix, as in Anthropic
  HH-RLHF. The prompt is their longest common prefix, cut back to the end of the last ``"Assistant:"``
  marker inside it when there is one, otherwise to the last whitespace. So the completion is always the
  whole final assistant turn (``" I'm sorry..."``), never a word split in two, and it starts with the space
  that byte-level BPE tokenizers attach to the following word. (TRL's ``extract_prompt`` cuts at the first
  differing *character*, which splits words such as "I" / "It"; the cut here differs only in that case.)
* **conversational**: the fields are lists of ``{"role", "content"}`` messages (the prompt explicit or the
  shared leading messages); they are rendered with the tokenizer's chat template.

Tokenization follows TRL's ``DPOTrainer`` (``trl/trainer/dpo_trainer.py``, ``_prepare_dataset``) so that
results are comparable: the EOS token is appended to plain-text completions; prompt, prompt+chosen and
prompt+rejected are tokenized whole, and the completion starts where the prompt's own tokens stop matching
both (``common_prefix_length``); the tokenizer's own special-token handling applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.errors import DataError

logger = logging.getLogger(__name__)

Message = dict[str, str]
Text = str | list[Message]

_ASSISTANT_MARKER = "Assistant:"


@dataclass
class PreferencePair:
    """One preference pair; ``prompt``, ``chosen`` and ``rejected`` are all strings or all message lists."""

    prompt: Text
    chosen: Text
    rejected: Text
    location: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class PairStats:
    """Counts of what happened to the rows of a data set on the way to training examples."""

    rows: int = 0
    kept: int = 0
    dropped_identical: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    empty_completion: int = 0

    def describe(self) -> str:
        return (
            f"{self.rows} rows -> {self.kept} pairs ({self.dropped_identical} dropped with chosen == rejected, "
            f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
            f"{self.empty_completion} with an empty chosen or rejected answer kept as EOS only)"
        )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def check_text(value: Any, field: str, location: str) -> Text:
    """``value`` if it is a non-empty string or a non-empty list of ``{role, content}`` messages.

    Raises:
        DataError: null, empty or of another type (the message names ``location`` and ``field``).
    """
    if value is None:
        raise DataError(f"{location}: field {field!r} is null")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{location}: field {field!r} is empty")
        return value
    if _is_messages(value):
        if not value:
            raise DataError(f"{location}: field {field!r} is an empty message list")
        return value
    raise DataError(
        f"{location}: field {field!r} must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two transcripts that share a prefix into ``(prompt, chosen_completion, rejected_completion)``.

    The prompt is the longest common prefix, cut back to just after the last ``"Assistant:"`` in it, or,
    without such a marker, to just before the last whitespace character (see the module docstring).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    prefix = chosen[:n]
    marker = prefix.rfind(_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(_ASSISTANT_MARKER)
    else:
        cut = max(prefix.rfind(" "), prefix.rfind("\n"), prefix.rfind("\t"))
        cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_implicit_messages(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(
    row: dict[str, Any],
    location: str,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> PreferencePair:
    """Turn one raw row into a :class:`PreferencePair`, detecting its format.

    Raises:
        DataError: a field is missing, null, empty or of the wrong type (the message names the location).
    """
    for col in (chosen_column, rejected_column):
        if col not in row:
            raise DataError(f"{location}: missing field {col!r} (fields present: {', '.join(map(str, row))})")
    chosen = check_text(row[chosen_column], chosen_column, location)
    rejected = check_text(row[rejected_column], rejected_column, location)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{location}: {chosen_column!r} and {rejected_column!r} must both be text or both messages")
    prompt = row.get(prompt_column)
    if prompt is not None:
        prompt = check_text(prompt, prompt_column, location)
        if isinstance(prompt, str) and isinstance(chosen, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(chosen, str):
            raise DataError(f"{location}: the prompt is a message list but the completions are plain text")
        return PreferencePair(prompt, chosen, rejected, location)
    if isinstance(chosen, str):
        prompt, chosen_c, rejected_c = split_implicit_prompt(chosen, rejected)
    else:
        prompt, chosen_c, rejected_c = _split_implicit_messages(chosen, rejected)
    if not prompt:
        raise DataError(f"{location}: no '{prompt_column}' field and chosen/rejected share no prompt prefix")
    # An empty final assistant turn in a transcript is a real answer (HH-RLHF has a few: the labeler
    # preferred saying nothing); as text it becomes an EOS-only completion. A message list with no
    # message after the shared ones has nothing to render, so that is an error.
    if isinstance(chosen_c, list) and (not chosen_c or not rejected_c):
        raise DataError(f"{location}: chosen or rejected has no message after the shared prompt messages")
    return PreferencePair(prompt, chosen_c, rejected_c, location)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share (TRL: ``trl.data_utils.common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_text(tokenizer, text: Text, *, add_generation_prompt: bool = False, **chat_template_kwargs: Any) -> list[int]:
    """Token ids of a string (the tokenizer's own special-token handling) or of a message list rendered with
    the chat template (``add_generation_prompt`` opens an assistant turn; ``chat_template_kwargs`` go to
    ``apply_chat_template``, template variables such as ``enable_thinking``)."""
    if isinstance(text, list):
        out = tokenizer.apply_chat_template(
            text, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True,
            **chat_template_kwargs,
        )
        return list(out["input_ids"])
    return list(tokenizer(text).input_ids)


def tokenize_pair(pair: PreferencePair, tokenizer) -> dict[str, list[int]]:
    """Tokenize a pair as TRL's DPOTrainer does.

    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"}``: the completion ids start where the tokenized prompt
        stops being a prefix of both tokenized prompt+completion sequences.

    Raises:
        DataError: if the chat template fails on the row, or the prompt tokenizes to nothing.
    """
    try:
        if pair.conversational:
            prompt_ids = tokenize_text(tokenizer, pair.prompt, add_generation_prompt=True)
            pc = tokenize_text(tokenizer, pair.prompt + pair.chosen)
            pr = tokenize_text(tokenizer, pair.prompt + pair.rejected)
        else:
            eos = tokenizer.eos_token
            chosen = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
            rejected = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
            prompt_ids = tokenize_text(tokenizer, pair.prompt)
            pc = tokenize_text(tokenizer, pair.prompt + chosen)
            pr = tokenize_text(tokenizer, pair.prompt + rejected)
    except Exception as exc:  # a chat template raising on odd roles, say
        raise DataError(f"{pair.location}: cannot tokenize: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    n = min(common_prefix_length(prompt_ids, pc), common_prefix_length(prompt_ids, pr))
    if n == 0:
        raise DataError(f"{pair.location}: the prompt tokenizes to no tokens")
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def _truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int, mode: str) -> tuple[list, list]:
    """Truncate prompt+completion to ``max_length`` tokens; returns ``(input_ids, completion_mask)``."""
    ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if len(ids) > max_length:
        sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        ids, mask = ids[sl], mask[sl]
    return ids, mask


def build_pair_examples(
    rows: list[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    max_completion_length: int | None = None,
) -> tuple[list[dict[str, list[int]]], PairStats]:
    """Parse, tokenize and truncate rows into training examples.

    Each example is ``{"chosen_input_ids", "chosen_completion_mask", "rejected_input_ids",
    "rejected_completion_mask"}``: token ids of prompt+completion and a 0/1 mask of completion tokens.

    Args:
        max_length: cap on prompt+completion tokens per sequence (``None``: no cap).
        truncation_mode: ``keep_start`` (cut the end, as TRL), ``keep_end`` (cut the start), or ``drop``
            (drop pairs where either sequence is too long). Pairs whose prompt alone fills ``max_length``
            under ``keep_start`` are dropped, since no completion token would remain (as TRL does).
        max_completion_length: keep at most the first this many tokens of each completion, before
            ``max_length`` applies (TRL ORPO's and CPO's ``max_completion_length``; ``None``: no cap).

    Raises:
        DataError: on the first bad row (missing or empty field, wrong type), naming its location.
    """
    stats = PairStats()
    examples = []
    for location, row in rows:
        stats.rows += 1
        pair = parse_pair(
            row, location, prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column
        )
        if pair.chosen == pair.rejected:
            stats.dropped_identical += 1
            continue
        if not pair.conversational and not (pair.chosen.strip() and pair.rejected.strip()):
            stats.empty_completion += 1
        tok = tokenize_pair(pair, tokenizer)
        if max_completion_length is not None:
            tok["chosen_ids"] = tok["chosen_ids"][:max_completion_length]
            tok["rejected_ids"] = tok["rejected_ids"][:max_completion_length]
        n_prompt = len(tok["prompt_ids"])
        longest = n_prompt + max(len(tok["chosen_ids"]), len(tok["rejected_ids"]))
        if max_length is not None and longest > max_length:
            if truncation_mode == "drop" or (truncation_mode == "keep_start" and n_prompt >= max_length):
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        mode = "keep_start" if truncation_mode == "drop" else truncation_mode
        limit = max_length if max_length is not None else longest
        c_ids, c_mask = _truncate(tok["prompt_ids"], tok["chosen_ids"], limit, mode)
        r_ids, r_mask = _truncate(tok["prompt_ids"], tok["rejected_ids"], limit, mode)
        examples.append(
            {
                "chosen_input_ids": c_ids,
                "chosen_completion_mask": c_mask,
                "rejected_input_ids": r_ids,
                "rejected_completion_mask": r_mask,
            }
        )
        stats.kept += 1
    return examples, stats


def _split_prompt(input_ids: list[int], completion_mask: list[int]) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` of one tokenized sequence (the completion starts at the first 1)."""
    start = completion_mask.index(1) if 1 in completion_mask else len(input_ids)
    return input_ids[:start], input_ids[start:]


def contrastive_rows(examples: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """For every ordered pair ``(i, j)`` of examples with different prompts, the sequence "prompt i + chosen
    completion j" (token-level concatenation) and its completion mask; returns ``(ids, masks, pairs)``."""
    parts = [_split_prompt(e["chosen_input_ids"], e["chosen_completion_mask"]) for e in examples]
    ids, masks, pairs = [], [], []
    for i, (prompt_i, _) in enumerate(parts):
        for j, (prompt_j, completion_j) in enumerate(parts):
            if i == j or prompt_i == prompt_j or not completion_j:
                continue
            ids.append(prompt_i + completion_j)
            masks.append([0] * len(prompt_i) + [1] * len(completion_j))
            pairs.append((i, j))
    return ids, masks, pairs


def collate_pairs(examples: list[Any], pad_token_id: int, *, contrastive: bool = False) -> dict[str, torch.Tensor]:
    """Stack pairs into one right-padded batch with all chosen sequences first, then all rejected.

    Args:
        examples: from :func:`build_pair_examples`; items that are lists (one example per objective, from a
            multi-objective data set) are flattened in order.
        pad_token_id: filler.
        contrastive: append, after the rejected rows, one row per ordered pair ``(i, j)`` of examples with
            different prompts: prompt ``i`` followed by chosen completion ``j`` (contrastive DPO).

    Returns:
        ``input_ids``, ``attention_mask``, ``completion_mask``: ``(2B + M, T)`` long tensors, ``T`` the longest
        sequence in the batch; rows ``0..B-1`` are chosen, ``B..2B-1`` rejected (TRL's
        ``DataCollatorForPreference`` layout), then the ``M`` contrastive rows, whose ``(i, j)`` are in
        ``contrastive_index`` ``(M, 2)`` when ``contrastive``. ``objective`` ``(B,)`` holds each pair's objective
        index when the examples carry one. Precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` ``(B,)``
        float tensors pass through.
    """
    examples = [e for item in examples for e in (item if isinstance(item, list) else [item])]
    seqs = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    masks = [e["chosen_completion_mask"] for e in examples] + [e["rejected_completion_mask"] for e in examples]
    pairs: list[tuple[int, int]] = []
    if contrastive:
        extra_ids, extra_masks, pairs = contrastive_rows(examples)
        seqs, masks = seqs + extra_ids, masks + extra_masks
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        completion_mask[i, : len(m)] = torch.tensor(m)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if contrastive:
        batch["contrastive_index"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    if "objective" in examples[0]:
        batch["objective"] = torch.tensor([e["objective"] for e in examples], dtype=torch.long)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch
