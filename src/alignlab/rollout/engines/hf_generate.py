"""Engines on transformers' ``generate``: ``generate`` (its default dynamic KV cache, the path alignlab has
always sampled with) and ``static`` (a static KV cache, the decode step compiled with ``torch.compile``)."""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext

import torch

from alignlab.ops import cpu_kernels
from alignlab.ops.logprobs import base_model
from alignlab.rollout.engines.base import (
    ENGINES,
    Completions,
    GenerationEngine,
    SamplingParams,
    check_prompts,
    concat,
    cut_at_eos,
    repeated,
)


class InverseCDFSampling:
    """A logits processor that draws each row's next token from ``softmax(scores)`` and returns scores whose
    only finite entry (0) is the drawn token, so that ``generate``'s greedy argmax picks it.

    Inverse transform sampling: one uniform ``u`` per row, the token is the first whose cumulative probability
    (float64) reaches ``u`` times the total; a token of probability 0 is never drawn. It is the same
    distribution ``generate``'s own ``do_sample`` path draws from with ``torch.multinomial``, at a fraction of
    the cost: ``multinomial`` draws one exponential variate per vocabulary entry, this draws one uniform per
    row and makes one pass over the probabilities (19 ms saved per 116 ms decode step for 16 rows over the
    49k vocabulary of the embedded model on the 2-core CPU measured; ``benchmarks/generation.py``,
    docs/rollouts.md). Uses the global torch generator, as ``multinomial``.

    ``logps`` collects, per call, the ``(rows, 1)`` float32 log-probability of the drawn tokens under
    ``softmax(scores)``: the sampling distribution after the warpers before it. ``greedy=True`` takes the
    most likely token instead of drawing (no random numbers used) and records its log-prob the same way.
    """

    def __init__(self, greedy: bool = False) -> None:
        self.greedy = greedy
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # (rows, V)
        if self.greedy:
            tokens = logp.argmax(dim=-1, keepdim=True)
        else:
            cdf = logp.exp().double().cumsum_(dim=-1)
            u = (1.0 - torch.rand((cdf.shape[0], 1), dtype=torch.float64, device=cdf.device)) * cdf[:, -1:]  # (0, 1]
            tokens = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)  # (rows, 1)
        self.logps.append(logp.gather(1, tokens))
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


def sampling_processors(params: SamplingParams):
    """transformers' ``LogitsProcessorList`` for ``params``, in the order ``generate`` builds it from a
    ``GenerationConfig`` (``_get_logits_processor``): the repetition penalty, then the temperature, top-k, top-p
    and min-p warpers; each left out where it is off, and all of them for greedy decoding (``do_sample=False``).
    The repetition penalty sees every token of the row so far: the prompt (and, left-padded, the pad token) and
    the completion."""
    from transformers import (
        LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if not params.do_sample:
        return processors
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        processors.append(MinPLogitsWarper(params.min_p))
    return processors


@ENGINES.register("generate")
class GenerateEngine(GenerationEngine):
    """``--generation_backend generate``: transformers' ``generate`` with its default ``DynamicCache``.

    Prompts are left-padded (every row's next token at the same position) in chunks of ``batch_size``
    prompts, each repeated ``num_generations`` times. A chunk decodes in segments of ``segment_tokens`` new
    tokens, one ``generate`` call each, continuing from the KV cache of the segment before; between segments
    the rows that have drawn EOS leave the batch (their cache rows dropped with the cache's
    ``batch_select_indices``), so finished completions stop costing decode work (not for a model whose
    forwards gather its FSDP2 shards from the other processes, outside
    :func:`~alignlab.train.distributed.gathered_parameters`: there each process runs one call with
    ``synced_gpus``, so that all of them run the same number of forwards). ``generate`` alone would keep
    them in the batch until the last row ends: on the 2-core CPU measured, 64 rows of up to 128 tokens that
    end at EOS took 1.36x less time this way (benchmarks/README.md). ``segment_tokens=None``: one call for
    all ``max_new_tokens``.

    Only the settings of :class:`SamplingParams` act on the distribution (:func:`sampling_processors`; the
    checkpoint's own generation defaults, e.g. its repetition penalty, are not applied); the token is drawn by :class:`InverseCDFSampling` at the end of
    ``generate``'s logits processors on its greedy path (``do_sample=False``), which also records the
    log-probs. The calls run inside the CPU speed layer's decoding context
    (:func:`alignlab.ops.cpu_kernels.decoding`).
    """

    name = "generate"
    segment_tokens: int | None = 16

    def _generation_config(self, params: SamplingParams, max_new_tokens: int):
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=params.eos_token_id,
                                pad_token_id=params.pad_token_id, use_cache=True, return_dict_in_generate=True)

    def _width(self, longest_prompt: int) -> int:
        """Columns of the left-padded prompt block (the longest prompt)."""
        return longest_prompt

    def _decoding_context(self, rows: int):
        return cpu_kernels.decoding(self.model, rows=rows)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        check_prompts(prompt_ids)
        sampler = InverseCDFSampling(greedy=not params.do_sample)
        processors = sampling_processors(params)
        processors.append(sampler)
        device = next(self.model.parameters()).device
        batch_size = params.batch_size or len(prompt_ids)
        parts = []
        # one reordered copy of the weights for all chunks (the rows hint: a full chunk)
        with self._decoding_context(min(batch_size, len(prompt_ids)) * params.num_generations):
            for start in range(0, len(prompt_ids), batch_size):
                # each prompt repeated num_generations times (generate's num_return_sequences does the same, but
                # refuses the greedy path)
                chunk = repeated(prompt_ids[start : start + batch_size], params.num_generations)
                width = self._width(max(len(p) for p in chunk))
                pad = params.pad_token_id
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                rows, logps = self._decode(input_ids, attention_mask, params, processors, sampler)
                parts.append(cut_at_eos(rows, logps if params.return_logps else None, params, first_prompt=start))
        return concat(parts)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams, processors,
                sampler: InverseCDFSampling) -> tuple[list[list[int]], list[list[float]]]:
        """The new tokens of each row of the left-padded ``input_ids`` ``(B, width)`` and their log-probs, each
        row ending at its first EOS or at ``max_new_tokens`` (tokens after an EOS may follow; the caller cuts)."""
        model = self.model
        # a model whose forwards gather its weights from other processes (FSDP2, not gathered beforehand): every
        # process must run as many forwards as the slowest, so one call with generate's synced_gpus. Otherwise
        # synced_gpus is off, also for a sharded model whose weights are gathered already (generate would
        # turn it on for an FSDP-managed model, and a process whose rows all ended could not leave early)
        from alignlab.train.distributed import forwards_gather

        synced = forwards_gather(model)
        segment = params.max_new_tokens if synced else self.segment_tokens or params.max_new_tokens
        tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        logps: list[list[float]] = [[] for _ in range(input_ids.shape[0])]
        alive = list(range(input_ids.shape[0]))  # the batch's rows, by their index in the chunk
        cache_keyword = _cache_keyword(model)
        cache = None  # the first call makes its own (DynamicCache); the next ones continue from it
        produced = 0
        while produced < params.max_new_tokens:
            sampler.logps.clear()
            config = self._generation_config(params, min(segment, params.max_new_tokens - produced))
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=processors, synced_gpus=synced,
                                 **({cache_keyword: cache} if cache is not None else {}))
            new = out.sequences[:, input_ids.shape[1]:]  # (alive, segment), fewer when every row drew EOS
            new_logps = torch.cat(sampler.logps, dim=1)  # (alive, new.shape[1])
            for row, ids, lps in zip(alive, new.tolist(), new_logps.tolist()):
                tokens[row] += ids
                logps[row] += lps
            produced += new.shape[1]
            ended = (new == params.eos_token_id).any(dim=1)
            if bool(ended.all()) or produced >= params.max_new_tokens:
                break
            input_ids = out.sequences
            attention_mask = torch.cat([attention_mask, torch.ones_like(new)], dim=1)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            if bool(ended.any()):
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                input_ids, attention_mask = input_ids[keep], attention_mask[keep]
                alive = [alive[i] for i in keep.tolist()]
        return tokens, logps


def _cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``generate`` takes a KV cache to continue from under: ``cache`` in newer transformers
    releases, ``past_key_values`` before (the model's forward names it)."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


@ENGINES.register("static")
class StaticEngine(GenerateEngine):
    """``--generation_backend static``: :class:`GenerateEngine` with transformers' ``StaticCache`` and its
    compiled decode step (``cache_implementation="static"`` and a ``CompileConfig``: ``generate`` runs the
    prefill eagerly and every decode step through ``torch.compile(model.__call__)``, kept on the model).

    On CUDA the compile mode is ``"reduce-overhead"`` (CUDA graphs); on the CPU ``"default"`` (TorchInductor's
    C++/OpenMP kernels; transformers compiles on the CPU only when asked, ``CompileConfig._compile_all_devices``).
    Shapes are static (``dynamic=False``): each new (rows, cache length) compiles again, so the prompt block is
    left-padded to a multiple of ``pad_multiple`` columns to keep the cache lengths few. The weights are graph
    inputs, not constants, so an optimizer step is seen without recompiling. The CPU speed layer's reordered
    weights are not used here: a fresh copy per call would be a new graph input each time.
    """

    name = "static"
    segment_tokens = None  # one call: dropping rows from a static cache would be a new compiled shape

    def __init__(self, model: torch.nn.Module, pad_multiple: int = 64) -> None:
        super().__init__(model)
        self.pad_multiple = pad_multiple
        self._compile_configs: dict[str, object] = {}
        self._compiled = None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        # transformers keeps the compiled call on the model (``_compiled_call``); a deep copy of a model that
        # has one shares it, and it would go on decoding with the original's weights: compile for this model
        holder = base_model(self.model)  # peft's inner model
        compiled = holder.__dict__.get("_compiled_call")
        if compiled is not None and compiled is not self._compiled:
            del holder._compiled_call
        out = super().generate(prompt_ids, params)
        self._compiled = holder.__dict__.get("_compiled_call")
        return out

    def _compile_config(self, device_type: str):
        from transformers import CompileConfig

        if device_type not in self._compile_configs:  # one object per device: generate recompiles on a new one
            config = CompileConfig(fullgraph=False, dynamic=False,
                                   mode="reduce-overhead" if device_type == "cuda" else "default")
            config._compile_all_devices = True
            self._compile_configs[device_type] = config
        return self._compile_configs[device_type]

    def _width(self, longest_prompt: int) -> int:
        return -(-longest_prompt // self.pad_multiple) * self.pad_multiple

    def _decoding_context(self, rows: int):
        return nullcontext()

    def _generation_config(self, params: SamplingParams, max_new_tokens: int):
        config = super()._generation_config(params, max_new_tokens)
        config.cache_implementation = "static"
        config.compile_config = self._compile_config(next(self.model.parameters()).device.type)
        return config
