"""``--generation_backend paged``: transformers' continuous batching over a paged KV cache."""

from __future__ import annotations

import torch

from alignlab.errors import UserError
from alignlab.ops import cpu_kernels
from alignlab.rollout.engines.base import (
    ENGINES,
    Completions,
    GenerationEngine,
    SamplingParams,
    check_prompts,
    cut_at_eos,
    repeated,
)


PAGED_MIN_TRANSFORMERS = "5.19"
"""The first transformers release whose continuous batching takes every setting used here (``page_size`` and
``auto_switch_to_flash`` of ``ContinuousBatchingConfig``); the rest of alignlab runs on older 5.x releases."""
PAGE_SIZE = 64
"""Tokens per page of the paged KV cache."""
MAX_BATCH_TOKENS = 4096
"""Most tokens in one forward (prefill chunks of several prompts, plus one per decoding request)."""


@ENGINES.register("paged")
class PagedEngine(GenerationEngine):
    """Continuous batching from transformers (``model.init_continuous_batching``, the
    ``ContinuousBatchingManager`` behind ``generate_batch``): one request per completion; the manager's
    scheduler packs prefill and decode tokens of all running requests into each forward, with the KV cache in
    fixed-size pages, and a request that hits EOS or its length limit frees its pages and slot for a waiting
    one at the next step (no padding, no finished rows decoding on).

    Sampling is the manager's (``torch.multinomial`` over ``softmax`` of the logits after transformers'
    temperature / top-k / top-p warpers; it reseeds the global torch generator from a draw of it, so a run is
    reproducible from ``torch.manual_seed`` but its draws differ from ``generate``'s), and it returns the
    drawn tokens' log-probs (``return_logprobs``): float32 ``log softmax`` of the warped logits, the
    distribution the token was drawn from.

    The manager decodes in a thread of its own; the caller's autocast state and no-grad mode, which are
    per-thread in PyTorch, are carried into it, and the CPU speed layer's reordered weights
    (:func:`alignlab.ops.cpu_kernels.decoding`) are in place for the call. The attention runs as the model's
    ``sdpa`` / ``eager`` (as ``paged|eager``) / flash implementation over the paged cache (the manager switches
    it for the call and back).

    Autocast to another dtype than the weights' is refused (the paged cache is allocated in the weights' dtype
    and the keys and values would come out of autocast in the other): a bf16-autocast run over float32
    weights samples with another backend.

    Args:
        model: the policy.
        max_slots: requests decoded at once (``ContinuousBatchingConfig.max_requests_per_batch``; default: the
            manager's choice from the memory and workload).
    """

    name = "paged"

    def __init__(self, model: torch.nn.Module, max_slots: int | None = None) -> None:
        super().__init__(model)
        self.max_slots = max_slots

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version(PAGED_MIN_TRANSFORMERS):
            raise UserError(f"--generation_backend paged needs transformers >= {PAGED_MIN_TRANSFORMERS} (installed: "
                            f"{transformers.__version__}): upgrade it, or use another backend")
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        check_prompts(prompt_ids)
        if params.do_sample and params.repetition_penalty != 1.0:
            raise UserError("--generation_backend paged cannot apply --repetition_penalty (transformers' continuous "
                            "batching drops it): use --generation_backend generate or static")
        rows = repeated(prompt_ids, params.num_generations)
        generation_config = GenerationConfig(
            do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k or None, min_p=params.min_p or None, max_new_tokens=params.max_new_tokens, eos_token_id=params.eos_token_id,
            pad_token_id=params.pad_token_id,
        )
        # the cache sized for this workload (the manager's default takes a share of all free memory, which on
        # the CPU means zeroing gigabytes per call): every row's pages, PAGE_SIZE tokens each
        pages_per_row = -(-(max(map(len, rows)) + params.max_new_tokens) // PAGE_SIZE)
        cb_config = ContinuousBatchingConfig(
            return_logprobs=True, max_requests_per_batch=self.max_slots, auto_switch_to_flash=False,
            page_size=PAGE_SIZE, num_blocks=len(rows) * pages_per_row + 1,
            max_batch_tokens=max(max(map(len, rows)), min(sum(map(len, rows)), MAX_BATCH_TOKENS)),
        )
        hints = WorkloadHints(max_prompt_length=max(map(len, rows)), max_generated_length=params.max_new_tokens,
                              num_requests=len(rows))
        model = self.model
        manager = model.init_continuous_batching(generation_config=generation_config,
                                                 continuous_batching_config=cb_config, workload_hints=hints)
        autocast = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda")}
        device_type = next(model.parameters()).device.type
        if device_type in autocast and autocast[device_type][0] and autocast[device_type][1] != model.dtype:
            raise UserError(f"--generation_backend paged cannot sample under {autocast[device_type][1]} autocast over "
                            f"{model.dtype} weights (its KV cache takes the weights' dtype): use another backend, "
                            "or weights in the autocast dtype")
        loop = manager._run_generation_loop

        def run_in_callers_modes(*args, **kwargs) -> None:
            # autocast and grad mode are thread-local: the manager's thread starts with neither
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast["cpu"][1], enabled=autocast["cpu"][0]), \
                    torch.autocast("cuda", dtype=autocast["cuda"][1], enabled=autocast["cuda"][0]):
                loop(*args, **kwargs)

        manager._run_generation_loop = run_in_callers_modes
        results = {}
        with cpu_kernels.decoding(model, rows=min(len(rows), self.max_slots or len(rows))):
            if device_type == "cuda":
                manager.warmup()  # captures CUDA graphs when the manager uses them
            manager.start()
            try:
                for i, ids in enumerate(rows):
                    manager.add_request(ids, request_id=f"row{i}", max_new_tokens=params.max_new_tokens)
                while len(results) < len(rows):
                    result = manager.get_result(timeout=1)
                    if result is None:
                        if not manager.is_running():
                            raise RuntimeError("continuous batching stopped before every completion was done")
                    elif result.is_finished():
                        if result.error is not None:
                            raise RuntimeError(f"continuous batching failed: {result.error}")
                        results[result.request_id] = result
            finally:
                manager.stop(block=True)
                manager.destroy()
        ordered = [results[f"row{i}"] for i in range(len(rows))]
        logps = [list(r.logprobs) for r in ordered] if params.return_logps else None
        return cut_at_eos([list(r.generated_tokens) for r in ordered], logps, params)
