"""Supervised fine-tuning data: the three formats, chat templates, loss masks, truncation, packing, collation.

Formats (detected per row, in this order; column names are flags):

* **conversational** ``{"messages": [{"role", "content"}, ...]}``: rendered whole with the chat template;
* **prompt-completion** ``{"prompt", "completion"}``: both strings, or both message lists (a string prompt
  with message completions becomes one user message, as for preference data);
* **language modeling** ``{"text": "..."}`` (``--dataset_text_field``).

Tokenization follows TRL's ``SFTTrainer._prepare_dataset`` (``trl/trainer/sft_trainer.py``, TRL 1.16): EOS
is appended to plain-text completions and texts (not to chat-templated ones, whose template closes the turn);
prompt and prompt+completion are tokenized whole and the completion starts where the tokenized prompt stops
being a prefix of the tokenized prompt+completion (``common_prefix_length``).

Each example carries a ``loss_mask``: 1 on the tokens the model is trained to predict. It is the AND of

* the completion mask (prompt-completion rows, with ``completion_only_loss``), and
* the assistant mask (message rows, with ``assistant_only_loss``): the tokens of assistant turns. With a chat
  template that marks them with ``{% generation %}`` the mask comes from transformers
  (``return_assistant_tokens_mask``); otherwise each assistant turn's span is found by rendering prefixes of
  the conversation: it starts after ``messages[:i]`` rendered with the generation prompt and ends after
  ``messages[:i+1]`` rendered, both measured as token prefixes of the full rendering.

The first token of every example is never a target (nothing predicts it), so packed examples never train on
predicting one example's first token from the previous one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.data.preference import Message, Text, check_text, tokenize_text, common_prefix_length
from alignlab.errors import DataError
from alignlab.ops.logprobs import pack_rows

logger = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class SFTSample:
    """One parsed row. ``kind`` is ``"messages"``, ``"prompt_completion"`` or ``"text"``."""

    kind: str
    location: str
    messages: list[Message] | None = None
    prompt: Text | None = None
    completion: Text | None = None
    text: str | None = None

    @property
    def conversational(self) -> bool:
        return self.kind == "messages" or isinstance(self.completion, list)


@dataclass
class SFTStats:
    """Counts of what happened to the rows of a data set on the way to training examples."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_target: int = 0

    def describe(self) -> str:
        return (
            f"{self.rows} rows -> {self.kept} examples ({self.truncated} truncated to --max_length, "
            f"{self.dropped_no_target} dropped with no token to train on)"
        )


def parse_sft_row(
    row: dict[str, Any],
    location: str,
    *,
    dataset_text_field: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
) -> SFTSample:
    """Turn one raw row into an :class:`SFTSample`, detecting its format (messages, prompt-completion, text).

    Raises:
        DataError: no usable field, a field missing, null, empty or of the wrong type, or a prompt-completion
            row mixing a message-list prompt with a text completion (the message names the location).
    """
    if messages_column in row:
        messages = check_text(row[messages_column], messages_column, location)
        if isinstance(messages, str):
            raise DataError(f"{location}: field {messages_column!r} must be a list of {{role, content}} messages")
        return SFTSample("messages", location, messages=messages)
    if prompt_column in row or completion_column in row:
        for col in (prompt_column, completion_column):
            if col not in row:
                raise DataError(f"{location}: missing field {col!r} (fields present: {', '.join(map(str, row))})")
        prompt = check_text(row[prompt_column], prompt_column, location)
        completion = check_text(row[completion_column], completion_column, location)
        if isinstance(prompt, str) and isinstance(completion, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(completion, str):
            raise DataError(f"{location}: the prompt is a message list but the completion is plain text")
        return SFTSample("prompt_completion", location, prompt=prompt, completion=completion)
    if dataset_text_field in row:
        text = check_text(row[dataset_text_field], dataset_text_field, location)
        if isinstance(text, list):  # some data sets keep conversations in their text column
            return SFTSample("messages", location, messages=text)
        return SFTSample("text", location, text=text)
    raise DataError(
        f"{location}: missing field: expected {messages_column!r}, {prompt_column!r} and {completion_column!r}, "
        f"or {dataset_text_field!r} (fields present: {', '.join(map(str, row)) or 'none'})"
    )


def has_generation_tags(tokenizer) -> bool:
    """True if the tokenizer's chat template marks assistant text with ``{% generation %}``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def render_with_assistant_mask(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Tokenize a conversation with the chat template and mark the tokens of its assistant turns.

    Returns:
        ``(input_ids, assistant_mask)``, two lists of one length; the mask is 1 on the tokens the chat
        template emits for each assistant message (its content and the end-of-turn tokens that follow it).

    With ``{% generation %}`` in the template the mask is transformers' ``assistant_masks``
    (``apply_chat_template(return_assistant_tokens_mask=True)``, what TRL's ``assistant_only_loss`` uses).
    Otherwise, for assistant message ``i``: start = length of the common token prefix of the full rendering
    and ``messages[:i]`` rendered with ``add_generation_prompt=True``; end = the same for ``messages[:i+1]``
    rendered without it (the last assistant message runs to the end, one that opens the conversation starts
    at token 0). The prefix rendering is that of OpenRLHF's
    ``SFTDataset(multiturn=True)`` (``openrlhf/datasets/sft_dataset.py``), measured here in tokens rather
    than characters. It needs a template that renders earlier turns the same whatever follows them, true of
    ChatML-style templates (SmolLM2, Qwen2.5) and Llama 3's.

    Raises:
        Exception: whatever the chat template raises (callers turn it into a :class:`DataError`).
    """
    if has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [int(bool(b)) for b in out["assistant_masks"]]
    ids = tokenize_text(tokenizer, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = common_prefix_length(ids, tokenize_text(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(ids) if i == len(messages) - 1 else common_prefix_length(ids, tokenize_text(tokenizer, messages[: i + 1]))
        for t in range(start, end):
            mask[t] = 1
    return ids, mask


def tokenize_sft(
    sample: SFTSample,
    tokenizer,
    *,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
) -> dict[str, list[int]]:
    """Tokenize one sample into ``{"input_ids", "loss_mask"}`` (see the module docstring for the mask).

    Args:
        completion_only_loss: prompt-completion rows: targets are completion tokens only.
        assistant_only_loss: conversational rows: targets are assistant-turn tokens only.

    Raises:
        DataError: the chat template fails on the row, or ``assistant_only_loss`` is set and the conversation
            has no assistant message.
    """
    loc = sample.location
    if assistant_only_loss and sample.kind == "messages" and not any(m["role"] == "assistant" for m in sample.messages):
        raise DataError(f"{loc}: no assistant message to train on (or pass --assistant_only_loss false)")
    eos = tokenizer.eos_token
    try:
        if sample.kind == "text":
            text = sample.text if sample.text.endswith(eos) else sample.text + eos
            ids = tokenize_text(tokenizer, text)
            mask = [1] * len(ids)
        elif sample.kind == "messages":
            ids, assistant = render_with_assistant_mask(tokenizer, sample.messages)
            mask = assistant if assistant_only_loss else [1] * len(ids)
        elif isinstance(sample.completion, list):
            prompt_ids = tokenize_text(tokenizer, sample.prompt, add_generation_prompt=True)
            ids, assistant = render_with_assistant_mask(tokenizer, sample.prompt + sample.completion)
            n = common_prefix_length(prompt_ids, ids)
            mask = [0] * n + [1] * (len(ids) - n) if completion_only_loss else [1] * len(ids)
            if assistant_only_loss:
                mask = [a & b for a, b in zip(mask, assistant)]
        else:
            completion = sample.completion if sample.completion.endswith(eos) else sample.completion + eos
            prompt_ids = tokenize_text(tokenizer, sample.prompt)
            ids = tokenize_text(tokenizer, sample.prompt + completion)
            n = common_prefix_length(prompt_ids, ids)
            mask = [0] * n + [1] * (len(ids) - n) if completion_only_loss else [1] * len(ids)
    except DataError:
        raise
    except Exception as exc:  # a chat template raising on odd roles, a tokenizer without a template
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise DataError(f"{loc}: cannot tokenize: {first}") from exc
    if mask:
        mask[0] = 0
    return {"input_ids": ids, "loss_mask": mask}


def build_sft_examples(
    rows: list[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
    dataset_text_field: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
) -> tuple[list[dict[str, list[int]]], SFTStats]:
    """Parse, tokenize and truncate rows into training examples ``{"input_ids", "loss_mask"}``.

    Args:
        max_length: cap on tokens per example (``None``: no cap). ``keep_start`` cuts the end (TRL's default),
            ``keep_end`` cuts the start. Examples left with no target token are dropped and counted (as TRL).

    Raises:
        DataError: on the first bad row, naming its location.
    """
    stats = SFTStats()
    examples = []
    for location, row in rows:
        stats.rows += 1
        sample = parse_sft_row(
            row,
            location,
            dataset_text_field=dataset_text_field,
            prompt_column=prompt_column,
            completion_column=completion_column,
            messages_column=messages_column,
        )
        ex = tokenize_sft(
            sample, tokenizer, completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss
        )
        if max_length is not None and len(ex["input_ids"]) > max_length:
            sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ex = {"input_ids": ex["input_ids"][sl], "loss_mask": ex["loss_mask"][sl]}
            ex["loss_mask"][0] = 0
            stats.truncated += 1
        if not any(ex["loss_mask"]):
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
        stats.kept += 1
    return examples, stats


def pack_sft_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into rows of at most ``max_length`` tokens (first-fit decreasing, deterministic).

    Each packed row has ``input_ids``, ``loss_mask`` and ``position_ids`` restarting at 0 at every example, so
    a model whose attention mask is built from ``position_ids`` (transformers' packed-sequence detection, used
    when no 2-D attention mask is passed) keeps the examples apart: the same numbers as unpacked rows. TRL:
    ``pack_dataset(strategy="bfd")`` with padding-free batches. Examples must already be ``<= max_length``.
    """
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_length)
    packed = []
    for members in rows:
        ids, mask, positions = [], [], []
        for i in members:
            ids += examples[i]["input_ids"]
            mask += examples[i]["loss_mask"]
            positions += list(range(len(examples[i]["input_ids"])))
        packed.append({"input_ids": ids, "loss_mask": mask, "position_ids": positions})
    return packed


def split_sft_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Examples longer than ``max_length`` cut into consecutive fragments of ``max_length`` tokens (the last one
    shorter), each then packed as an example of its own: TRL's ``packing_strategy="bfd_split"`` (no token is
    lost; a fragment's first token has no context, so it is not a target)."""
    out = []
    for e in examples:
        for start in range(0, len(e["input_ids"]), max_length):
            out.append({"input_ids": e["input_ids"][start : start + max_length],
                        "loss_mask": e["loss_mask"][start : start + max_length]})
    return out


def wrap_sft_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """All examples concatenated in order and cut every ``max_length`` tokens (the last row shorter), whatever
    the example boundaries: TRL's ``packing_strategy="wrapped"`` (``_pack_wrapped``). The rows carry no
    ``position_ids``: a token attends to every token before it in its row, across examples, as in TRL."""
    ids = [t for e in examples for t in e["input_ids"]]
    mask = [m for e in examples for m in e["loss_mask"]]
    return [{"input_ids": ids[start : start + max_length], "loss_mask": mask[start : start + max_length]}
            for start in range(0, len(ids), max_length)]


def padding_free_row(examples: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The examples of a batch concatenated into one row with ``position_ids`` restarting at each example (a
    packed example's own positions kept), so the collated batch has no padding: TRL's ``padding_free``
    (``DataCollatorForLanguageModeling(padding_free=True)``). The model then keeps the examples apart from the
    positions, as for packed rows: the same numbers as the padded batch."""
    ids, mask, positions = [], [], []
    for e in examples:
        ids += e["input_ids"]
        mask += e["loss_mask"]
        positions += e.get("position_ids") or list(range(len(e["input_ids"])))
    return [{"input_ids": ids, "loss_mask": mask, "position_ids": positions}]


def collate_sft(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into one right-padded batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``loss_mask``: ``(B, T)`` long tensors, ``T`` the longest example;
        plus ``position_ids`` ``(B, T)`` for packed examples, the padding counting from 0 as a segment of its
        own (so no real token attends to it).
    """
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    packed = "position_ids" in examples[0]
    position_ids = torch.zeros((n, width), dtype=torch.long) if packed else None
    for i, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[i, :length] = torch.tensor(e["input_ids"])
        attention_mask[i, :length] = 1
        loss_mask[i, :length] = torch.tensor(e["loss_mask"])
        if packed:
            position_ids[i, :length] = torch.tensor(e["position_ids"])
            position_ids[i, length:] = torch.arange(width - length)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch
