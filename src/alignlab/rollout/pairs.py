"""Offline preference pairs from sampled completions: for each prompt, its best completion against its worst
by reward (the pair-building step of iterative DPO and of ``compare``'s offline methods)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignlab.data.io import write_text_atomic
from alignlab.errors import UserError
from alignlab.rollout.experience import ScoredCompletions


def best_and_worst(scores: torch.Tensor, k: int) -> list[tuple[int, int] | None]:
    """For ``(P * k,)`` scores laid out prompt by prompt, the ``(best, worst)`` flat indices of each prompt's
    group (the first of equal scores), or ``None`` when all ``k`` scores are equal (no preference)."""
    out = []
    for g, group in enumerate(scores.view(-1, k)):
        best, worst = int(group.argmax()), int(group.argmin())
        out.append(None if group[best] == group[worst] else (g * k + best, g * k + worst))
    return out


def preference_rows(parts: list[ScoredCompletions], k: int) -> list[dict]:
    """Best-vs-worst preference pairs from completions sampled ``k`` per prompt (prompt-major, as
    :func:`~alignlab.rollout.experience.sample_and_score` lays them out): one row per prompt whose ``k`` scores
    are not all equal, ``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}``; for message
    prompts, chosen and rejected are assistant-message lists (the conversational pair format)."""
    rows = []
    for part in parts:
        for pick in best_and_worst(part.scores, k):
            if pick is None:
                continue
            best, worst = pick
            prompt = part.examples[best]["prompt"]
            chosen, rejected = part.texts[best], part.texts[worst]
            if isinstance(prompt, list):
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "score_chosen": float(part.scores[best]), "score_rejected": float(part.scores[worst])})
    return rows


def write_pairs(parts: list[ScoredCompletions], k: int, path: Path) -> int:
    """Write :func:`preference_rows` to ``path`` as JSON lines, atomically; returns the number of pairs.

    Raises:
        UserError: no prompt had completions with different scores (nothing to train on).
    """
    rows = preference_rows(parts, k)
    if not rows:
        raise UserError(f"{path}: every prompt's {k} completions scored the same: no preference pairs to train on")
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
