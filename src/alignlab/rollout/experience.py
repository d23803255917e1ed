"""The part of a rollout every online algorithm shares: sample completions for a batch of prompts, lay them
out as token sequences, and score them with the reward sources. PPO, GRPO and Online DPO add their own
log-prob, value and advantage computations on top."""

from __future__ import annotations

import dataclasses
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from alignlab.data.preference import tokenize_text
from alignlab.data.sequences import build_sequences, slice_rows
from alignlab.errors import UserError
from alignlab.rollout.engines import SamplingParams, engine_for
from alignlab.rollout.generation import Completions, completion_token_logps
from alignlab.rollout.rewards import RewardSource, compute_rewards


@dataclass
class ScoredCompletions:
    """``N = len(prompts) * num_generations`` sampled completions with their rewards (prompt-major order).

    Attributes:
        examples: the prompt example of each completion (repeated ``num_generations`` times).
        completions: token ids, EOS flags.
        sequences: :func:`~alignlab.data.sequences.build_sequences` of prompt+completion, on the device.
        texts: decoded completions (special tokens dropped).
        scores: ``(N,)`` float32 weighted reward, ``missing_eos_penalty`` applied.
        per_source: ``{name: (N,)}`` unweighted rewards per source, NaN where not applicable.
        generation_seconds, scoring_seconds: wall time of sampling and of computing rewards.
        dropped: completions left out for a bad reward by :meth:`without_bad_rewards` (``None``: not asked).
    """

    examples: list[dict[str, Any]]
    completions: Completions
    sequences: dict[str, torch.Tensor]
    texts: list[str]
    scores: torch.Tensor
    per_source: dict[str, torch.Tensor]
    generation_seconds: float
    scoring_seconds: float
    dropped: int | None = None

    @property
    def has_eos(self) -> torch.Tensor:
        return torch.tensor(self.completions.has_eos)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor(self.completions.lengths, dtype=torch.float32)

    def metrics(self) -> dict[str, Any]:
        """Metrics every online algorithm logs, with TRL 1.16 GRPO's names and definitions for the completion
        statistics (``_generate_and_score_completions``): lengths in tokens, EOS included;
        ``completions/mean_length``, ``min_length``, ``max_length`` over the step's completions;
        ``clipped_ratio``: the fraction without EOS (truncated at the length limit); ``mean_terminated_length``,
        ``min_terminated_length``, ``max_terminated_length`` over those with EOS (all 0 when none has). The
        minima and maxima are this process's (TRL takes them over every process's completions)."""
        lengths, has_eos = self.lengths, self.has_eos
        terminated = lengths[has_eos] if bool(has_eos.any()) else torch.zeros(1)
        out = {
            "completions/mean_length": lengths,
            "completions/min_length": float(lengths.min()) if lengths.numel() else 0.0,
            "completions/max_length": float(lengths.max()) if lengths.numel() else 0.0,
            "completions/clipped_ratio": (~has_eos).float(),
            "completions/mean_terminated_length": float(terminated.mean()),
            "completions/min_terminated_length": float(terminated.min()),
            "completions/max_terminated_length": float(terminated.max()),
            "time/generation": self.generation_seconds,
            "time/scoring": self.scoring_seconds,
            "tokens_per_second/generation": float(lengths.sum()) / max(self.generation_seconds, 1e-9),
        }
        for name, values in self.per_source.items():
            out[f"rewards/{name}/mean"] = torch.nanmean(values)
        if self.dropped is not None:
            out["rewards/dropped"] = float(self.dropped)
        return out

    def without_bad_rewards(self, group_size: int = 1) -> "ScoredCompletions":
        """These completions less those whose score is NaN (a reward function failed on them, see
        :func:`~alignlab.rollout.rewards.compute_rewards` with ``on_error="drop"``) and, with ``group_size``
        > 1, less every group of ``group_size`` adjacent completions (one prompt's) holding one: a group's
        advantages (GRPO) or a pair (Online DPO) need all of it. ``dropped`` counts what was left out.

        Raises:
            UserError: every completion was left out (nothing to train on).
        """
        bad = torch.isnan(self.scores)
        if not bad.any():
            return dataclasses.replace(self, dropped=self.dropped or 0)
        bad = bad.view(-1, group_size).any(dim=1).repeat_interleave(group_size)
        keep = (~bad).nonzero().flatten()
        if keep.numel() == 0:
            raise UserError(f"every one of the {bad.numel()} completions of this step has a bad reward "
                            "(--reward_func_errors drop): nothing left to train on")
        rows = keep.tolist()
        c = self.completions
        completions = Completions(ids=[c.ids[i] for i in rows], has_eos=[c.has_eos[i] for i in rows],
                                  prompt_index=[c.prompt_index[i] for i in rows],
                                  logps=None if c.logps is None else [c.logps[i] for i in rows])
        return ScoredCompletions(
            examples=[self.examples[i] for i in rows], completions=completions,
            sequences=slice_rows(self.sequences, keep.to(self.sequences["input_ids"].device)),
            texts=[self.texts[i] for i in rows], scores=self.scores[keep],
            per_source={name: values[keep] for name, values in self.per_source.items()},
            generation_seconds=self.generation_seconds, scoring_seconds=self.scoring_seconds,
            dropped=(self.dropped or 0) + int(bad.sum()),
        )

    def sample_rows(self, step: int) -> list[dict[str, Any]]:
        """``samples.jsonl`` rows: step, prompt, completion, score and each source's reward."""
        rows = []
        for i, (ex, text) in enumerate(zip(self.examples, self.texts)):
            row = {"step": step, "prompt": ex["prompt"], "completion": text, "score": float(self.scores[i])}
            row.update({f"rewards/{name}": float(v[i]) for name, v in self.per_source.items()})
            rows.append(row)
        return rows


def reward_model_inputs(reward_tokenizer, examples: list[dict], texts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt+completion as a reward model reads them: rendered with its own tokenizer as ``alignlab reward``
    (and TRL's ``RewardTrainer``) renders a training pair, the chat template for message prompts (the
    completion as a finished assistant turn, end-of-turn marker included), else ``prompt + completion + EOS``.
    TRL 1.16's GRPO, RLOO and Online DPO render a reward model's input through its chat template the same way
    (``reward_processing_classes``).

    Why not the sampled token ids: a reward model reads its score at the last token, which in training is the
    end of a rendered turn; the last sampled token is a bare EOS or, for a completion cut at the length limit,
    a word in mid-sentence, which it never saw there. Measured (benchmarks/README.md, "PPO's reward model reads
    what it was trained on"): the main job's two reward models ordered 57-59% of pairs of base-model
    completions as the task reward does when read from the token ids, and 67-69% rendered as here.

    Returns:
        ``{"input_ids", "attention_mask"}`` ``(N, T)``, right-padded with the reward tokenizer's pad token."""
    ids = []
    for ex, text in zip(examples, texts):
        prompt = ex["prompt"]
        if isinstance(prompt, list):
            ids.append(tokenize_text(reward_tokenizer, prompt + [{"role": "assistant", "content": text}]))
        else:
            ids.append(tokenize_text(reward_tokenizer, prompt + text + (reward_tokenizer.eos_token or "")))
    seq = build_sequences([i[:1] for i in ids], [i[1:] for i in ids], reward_tokenizer.pad_token_id)
    return {"input_ids": seq["input_ids"], "attention_mask": seq["attention_mask"]}


def sample_and_score_batches(policy: torch.nn.Module, tokenizer, examples: list[dict[str, Any]],
                             sources: list[RewardSource], *, batch_size: int, precision_fn,
                             progress: str | None = None, **kwargs: Any) -> list[ScoredCompletions]:
    """:func:`sample_and_score` over ``examples`` in chunks of ``batch_size`` prompts, one
    :class:`ScoredCompletions` per chunk (in order). ``precision_fn()`` makes a fresh precision context per
    chunk; ``progress`` names a tqdm bar (none when ``None``); ``kwargs`` go to :func:`sample_and_score`."""
    from tqdm.auto import tqdm

    starts = range(0, len(examples), batch_size)
    return [
        sample_and_score(policy, tokenizer, examples[start : start + batch_size], sources,
                         precision=precision_fn(), **kwargs)
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None)
    ]


def sample_and_score(
    policy: torch.nn.Module,
    tokenizer,
    examples: list[dict[str, Any]],
    sources: list[RewardSource],
    *,
    device: torch.device,
    precision: AbstractContextManager,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_generations: int = 1,
    missing_eos_penalty: float | None = None,
    reward_tokenizer=None,
    return_logps: bool = False,
    padding_free: bool = False,
    on_error: str = "raise",
    generation_backend: str = "auto",
    do_sample: bool = True,
) -> ScoredCompletions:
    """Sample ``num_generations`` completions per prompt example and score them.

    Args:
        policy: the (unwrapped) policy, eval mode.
        tokenizer: the policy's tokenizer.
        examples: from :func:`alignlab.data.prompts.build_prompt_examples`.
        sources: from :func:`alignlab.rollout.rewards.build_reward_sources`, models attached.
        device: where the sequences go.
        precision: a fresh autocast context (entered once) for sampling and the reward models, e.g.
            ``runtime.precision()`` (:class:`alignlab.train.runtime.Runtime`).
        max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, num_generations: sampling settings
            (:class:`~alignlab.rollout.engines.SamplingParams`).
        missing_eos_penalty: subtracted from the score of completions without EOS (TRL); ``None``: none.
        reward_tokenizer: the reward model's tokenizer: a reward model scores the completions rendered as it
            was trained (:func:`reward_model_inputs`); ``None``: the policy's token ids are scored as they are.
        return_logps: put the ``(N, L)`` log-probs of the sampled tokens under the sampling distribution in
            ``sequences["sampling_logps"]`` (0 on padding); PPO takes its old log-probs from them, as TRL does.
        padding_free: the reward models score packed rows (no compute on padding).
        on_error: a reward function that fails or returns a bad value: ``"raise"`` a :class:`UserError`;
            ``"drop"``: the completion's score is NaN (:func:`~alignlab.rollout.rewards.compute_rewards`); the
            caller leaves it out with :meth:`ScoredCompletions.without_bad_rewards`.
        generation_backend: the engine that samples (:func:`alignlab.rollout.engines.engine_for`, pointed at
            ``policy``'s current weights first); an engine that cannot return log-probs has them recomputed with
            one forward when ``return_logps``.
        do_sample: ``False``: greedy decoding (a baseline completion, as ReMax's).

    Raises:
        UserError: (``on_error="raise"``) a reward function failed or returned bad values.
    """
    prompt_ids = [ex["prompt_ids"] for ex in examples]
    start = time.perf_counter()
    with precision:
        engine = engine_for(policy, generation_backend)
        params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                                num_generations=num_generations, return_logps=return_logps, do_sample=do_sample)
        completions = engine.generate(prompt_ids, params)
        generation_seconds = time.perf_counter() - start

        start = time.perf_counter()
        per_completion = [examples[i] for i in completions.prompt_index]
        sequences = build_sequences(
            [ex["prompt_ids"] for ex in per_completion], completions.ids, tokenizer.pad_token_id
        )
        if completions.logps is not None:
            logps = torch.zeros(sequences["response_mask"].shape)
            for i, row in enumerate(completions.logps):
                logps[i, : len(row)] = torch.tensor(row)
            sequences["sampling_logps"] = logps
        sequences = {k: v.to(device) for k, v in sequences.items()}
        if return_logps and completions.logps is None:  # the engine returns none: one forward
            with torch.no_grad():
                sequences["sampling_logps"] = completion_token_logps(
                    policy, sequences, temperature=temperature, padding_free=padding_free,
                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
        prompts = [ex["prompt"] for ex in per_completion]
        shown = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        columns = {k: [ex["columns"].get(k) for ex in per_completion] for k in per_completion[0]["columns"]}
        needs_model = any(s.model is not None for s in sources)
        inputs = None
        if needs_model:
            inputs = sequences if reward_tokenizer is None else reward_model_inputs(reward_tokenizer, per_completion, texts)
        scores, per_source = compute_rewards(
            sources, prompts=prompts, completions=shown, completion_ids=completions.ids, columns=columns,
            reward_inputs=inputs, padding_free=padding_free, on_error=on_error,
        )
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~torch.tensor(completions.has_eos)).float()
    return ScoredCompletions(
        examples=per_completion,
        completions=completions,
        sequences=sequences,
        texts=texts,
        scores=scores,
        per_source=per_source,
        generation_seconds=generation_seconds,
        scoring_seconds=time.perf_counter() - start,
    )
