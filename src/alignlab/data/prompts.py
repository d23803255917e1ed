"""Prompt data for the online algorithms (PPO, GRPO, Online DPO): the formats users bring and tokenization.

Formats (detected per row):

* ``{"prompt": str}``: plain text, tokenized as is (no chat template), as TRL does for string prompts;
* ``{"prompt": [{"role", "content"}, ...]}``: conversational, rendered with the tokenizer's chat template and
  an open assistant turn (``add_generation_prompt``);
* preference pairs without a prompt column (``{"chosen", "rejected"}`` transcripts, as Anthropic HH-RLHF):
  the prompt is extracted as for DPO (:func:`alignlab.data.preference.parse_pair`), so the same pairs file
  trains a reward model and gives PPO its prompts.

Every other column of the row travels with the example and reaches the reward functions as a keyword list
(TRL's convention: ``fn(prompts, completions, **columns)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from alignlab.data.preference import Text, check_text, parse_pair, tokenize_text
from alignlab.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class PromptStats:
    """Counts of what happened to the rows of a prompt set."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    from_pairs: int = 0

    def describe(self) -> str:
        return (
            f"{self.rows} rows -> {self.kept} prompts ({self.from_pairs} extracted from preference pairs, "
            f"{self.truncated} cut to their last max_prompt_length tokens)"
        )


def parse_prompt(row: dict[str, Any], location: str, *, prompt_column: str = "prompt") -> Text:
    """The prompt of one row: its ``prompt_column``, else the shared prefix of its chosen/rejected pair.

    Raises:
        DataError: no prompt column and no pair, or an empty / malformed field (names the location).
    """
    if prompt_column in row:
        return check_text(row[prompt_column], prompt_column, location)
    if "chosen" in row and "rejected" in row:
        return parse_pair(row, location, prompt_column=prompt_column).prompt
    raise DataError(
        f"{location}: no {prompt_column!r} field and no chosen/rejected pair to take a prompt from "
        f"(fields present: {', '.join(map(str, row)) or 'none'})"
    )


def build_prompt_examples(
    rows: list[tuple[str, dict]],
    tokenizer,
    *,
    max_prompt_length: int | None = None,
    prompt_column: str = "prompt",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], PromptStats]:
    """Parse and tokenize prompt rows into examples ``{"prompt", "prompt_ids", "columns", "location"}``.

    Args:
        rows: ``(location, row)`` pairs from :func:`alignlab.data.io.read_rows`.
        tokenizer: the policy's tokenizer.
        max_prompt_length: keep at most this many tokens, the *last* ones (the end of a conversation is
            what the completion answers; TRL ``GRPOTrainer`` also truncates prompts on the left).
        prompt_column: the column holding the prompt.
        chat_template_kwargs: more ``apply_chat_template`` keyword arguments for conversational prompts (TRL's
            ``chat_template_kwargs``).

    Returns:
        ``(examples, stats)``. ``columns`` holds the row's other fields, for reward functions.

    Raises:
        DataError: on the first bad row, naming its location; a chat template that fails on a row.
    """
    stats = PromptStats()
    examples = []
    for location, row in rows:
        stats.rows += 1
        prompt = parse_prompt(row, location, prompt_column=prompt_column)
        if prompt_column not in row:
            stats.from_pairs += 1
        try:
            ids = tokenize_text(tokenizer, prompt, add_generation_prompt=isinstance(prompt, list),
                                **(chat_template_kwargs or {}))
        except Exception as exc:  # a chat template raising on odd roles, say
            raise DataError(f"{location}: cannot tokenize the prompt: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        if not ids:
            raise DataError(f"{location}: the prompt tokenizes to no tokens")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
            stats.truncated += 1
        columns = {k: v for k, v in row.items() if k != prompt_column}
        examples.append({"prompt": prompt, "prompt_ids": ids, "columns": columns, "location": location})
        stats.kept += 1
    return examples, stats
