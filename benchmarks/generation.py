"""Time per decode step of the rollout sampler, three ways, on the embedded model.

Variants, each the same prompts, rows and length:

* ``transformers``: ``generate`` sampling as transformers does it (``do_sample=True``: ``torch.multinomial``
  over the whole vocabulary, which draws one exponential variate per entry) with its default
  ``DynamicCache``. This is what TRL's trainers run without vLLM, and what alignlab ran before 2026-12-02.
* ``inverse-cdf``: alignlab's :func:`~alignlab.rollout.generation.sample_completions` as it runs (its default
  ``static_cache=False``): the same ``generate`` on its greedy path, the token drawn by
  :class:`~alignlab.rollout.generation.InverseCDFSampling` (one uniform per row); in float32, the linear
  layers decode from oneDNN-reordered weights (:func:`~alignlab.ops.linear.reordered_linear_weights`).
* ``inverse-cdf-mkl``: the same with the linear layers left as they are (float32: MKL ``sgemm``), as
  alignlab ran before 2026-12-03. Under bf16 autocast the two are the same code.
* ``inverse-cdf+static``: the same with ``static_cache=True``: transformers' ``StaticCache``, allocated once
  per call instead of growing every step.
* ``bf16-copy``: ``inverse-cdf`` from a :class:`~alignlab.rollout.sampler.RolloutSampler` copy
  (``--rollout_weights bfloat16``), refreshed from the policy before each call (the refresh is timed too),
  outside autocast. Only with bf16.

Prompts: the first rows of the built-in ``concise`` set (chat template, about 40 tokens), each repeated
``--generations`` times, as GRPO (4 prompts x 4) and Online DPO (16 x 2) lay them out. EOS is disabled (an id
outside the vocabulary) so that every row decodes all ``--tokens`` tokens and the variants do the same work.
Precision: bf16 autocast over float32 weights when :func:`alignlab.train.config.fast_bf16_available`, else
float32 (``--bf16`` overrides). The variants run in turn, ``--repeats`` rounds (after one warm-up round); the
median time of each is reported as milliseconds per generated position (the prefill included).

    .venv/bin/python benchmarks/generation.py [--prompts 4] [--generations 4] [--tokens 64] [--repeats 5]
        [--bf16 auto|true|false]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "alignlab" / "data" / "builtin" / "concise.jsonl"
TEMPERATURE = 1.0


def main() -> None:
    from transformers import GenerationConfig

    from alignlab.models import load_causal_lm, load_tokenizer
    from alignlab.rollout import generation
    from alignlab.rollout.generation import sample_completions
    from alignlab.rollout.sampler import RolloutSampler
    from alignlab.train.config import fast_bf16_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    args = parser.parse_args()
    bf16 = fast_bf16_available() if args.bf16 == "auto" else args.bf16 == "true"

    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None).eval()
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[: args.prompts]]
    prompt_ids = [list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]) for r in rows]
    no_eos = model.config.vocab_size + 7  # never sampled: every row runs to --tokens

    def transformers_sampling() -> None:
        chunk = [p for p in prompt_ids for _ in range(args.generations)]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                  max_new_tokens=args.tokens, eos_token_id=no_eos,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)

    def alignlab_sampling(static: bool, reorder: bool = True):
        def run() -> None:
            with nullcontext() if reorder else mock.patch.object(generation, "reordered_linear_weights",
                                                                  lambda model, rows: nullcontext(0)):
                sample_completions(model, prompt_ids, max_new_tokens=args.tokens, eos_token_id=no_eos,
                                   pad_token_id=tokenizer.pad_token_id, temperature=TEMPERATURE,
                                   num_generations=args.generations, static_cache=static)
        return run

    variants = {"transformers": transformers_sampling, "inverse-cdf": alignlab_sampling(False),
                "inverse-cdf-mkl": alignlab_sampling(False, reorder=False),
                "inverse-cdf+static": alignlab_sampling(True)}
    if bf16:
        copy = RolloutSampler(model, torch.bfloat16)

        def copy_sampling() -> None:
            copy.sync(model)
            with torch.autocast("cpu", enabled=False):
                sample_completions(copy.model, prompt_ids, max_new_tokens=args.tokens, eos_token_id=no_eos,
                                   pad_token_id=tokenizer.pad_token_id, temperature=TEMPERATURE,
                                   num_generations=args.generations)

        variants["bf16-copy"] = copy_sampling
    times: dict[str, list[float]] = {name: [] for name in variants}
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    torch.manual_seed(0)
    for round_ in range(args.repeats + 1):
        for name, run in variants.items():
            with torch.no_grad(), precision():
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            if round_:  # round 0 is the warm-up
                times[name].append(seconds)

    n_rows = args.prompts * args.generations
    print(f"{n_rows} rows ({args.prompts} prompts x {args.generations}), prompts of "
          f"{min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens, {args.tokens} new tokens, "
          f"{'bf16 autocast' if bf16 else 'float32'}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    base = statistics.median(times["transformers"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} {1000 * median / args.tokens:6.1f} ms/step  ({median:.2f} s per call; "
              f"all: {' '.join(f'{v:.2f}' for v in values)})  {base / median:.2f}x")


if __name__ == "__main__":
    main()
