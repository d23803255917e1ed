"""Rollout time of each generation backend (``--generation_backend``) on the embedded model, or on random-weight
models of the embedded model's and a 1.7B shape on CUDA.

For each precision and each row count, every backend samples the same prompts (the first rows of the built-in
``concise`` set, chat template, about 40 tokens, one completion each) for ``--tokens`` new tokens with EOS
disabled (an id outside the vocabulary), so every row decodes every token and the backends do the same work.
Backends run in alternation (A B C A B C ...: the CPU is shared, so a slow spell hits all of them alike) after
one warm-up round, whose extra time over the median is reported as the first call's cost (the compilation of
``static``). Reported: the median seconds per rollout (one ``generate`` call of the engine over all rows,
prefill included) and decode tokens per second (rows x tokens / that time).

``--eos`` lets completions end at the tokenizer's EOS instead, as in training rollouts: each backend then
decodes its own draws, of their own lengths, and decode tokens/s counts the tokens the measured rounds
generated over their time (``generate`` keeps a finished row in its batch until the last row ends; ``paged``
drops it).

Precision: ``float32`` and ``bf16`` (CPU: bf16 autocast over float32 weights, as training runs it, only where
bf16 matrix products are native, ``alignlab.train.config.fast_bf16_available``; CUDA: bf16 weights).

    .venv/bin/python benchmarks/generation.py [--rows 16 64] [--tokens 128] [--repeats 3]
        [--backends generate static paged] [--precision float32 bf16] [--device cpu|cuda] [--model embedded|1.7b]
        [--profile 15] [--config_dir DIR] [--eos] [--backends ... generate-one-call]

``--profile N`` then runs each backend once more under ``torch.profiler`` and prints where that rollout's
CPU time went: the share of the matrix products of the linear layers (``mkldnn::_linear_pointwise``,
``aten::addmm`` / ``mm``) and the N operators with the most time of their own. The profiler adds tens of
microseconds an operator, so read the shares, not the totals.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "alignlab" / "data" / "builtin" / "concise.jsonl"
SHAPES = {"1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=8192)}
"""Random-weight shapes built from the embedded model's config (``embedded``: its own shape)."""


def build_model(name: str, device: str, dtype: torch.dtype, config_dir: str | None = None):
    """The embedded model (CPU: its weights; CUDA, or with ``config_dir``: random weights of its shape) or a
    random ``SHAPES`` model, from the config in ``config_dir`` (default: the embedded model's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignlab.models import embedded_model_path, load_causal_lm

    if name == "embedded" and device == "cpu" and config_dir is None:
        return load_causal_lm(None, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(config_dir or embedded_model_path())
    for key, value in SHAPES.get(name, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


ONE_CALL = "generate-one-call"
"""A ``--backends`` value of this script only: the ``generate`` backend with one ``generate`` call per chunk
(``segment_tokens=None``), finished rows decoding on until the last one ends."""

LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")
"""The operators that multiply by the linear layers' weights (oneDNN's reordered copies, or MKL)."""


def print_profile(title: str, call, rows: int) -> None:
    """Run ``call`` under ``torch.profiler`` and print the linear layers' share of the CPU time and the ``rows``
    operators with the most self time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    linear = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS)
    print(f"\n{title}: {total / 1e6:.2f} s of operator time (profiled), linear layers' products "
          f"{linear / total:.0%}\n| operator | self s | share | calls |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")
    print(flush=True)


def main() -> None:
    from alignlab.models import load_tokenizer
    from alignlab.rollout.engines import SamplingParams, build_engine
    from alignlab.train.config import fast_bf16_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["generate", "static", "paged"])
    parser.add_argument("--precision", nargs="+", default=["float32", "bf16"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["embedded", *SHAPES], default="embedded")
    parser.add_argument("--config_dir", help="a directory with the config and tokenizer to shape the random-weight "
                        "models from, e.g. a copy of the embedded model's directory without its weights, for a "
                        "machine without the embedded model (default: the embedded model's)")
    parser.add_argument("--eos", action="store_true", help="stop each completion at the tokenizer's EOS")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more rollout per backend and print its N costliest operators")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.config_dir)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[: max(args.rows)]]
    all_prompts = [list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]) for r in rows]
    results = []
    for precision in args.precision:
        if precision == "bf16" and args.device == "cpu" and not fast_bf16_available():
            print("bf16: not native on this CPU, skipped")
            continue
        cuda_bf16 = precision == "bf16" and args.device == "cuda"
        model = build_model(args.model, args.device, torch.bfloat16 if cuda_bf16 else torch.float32, args.config_dir)
        # without --eos an id that is never sampled: every row runs to --tokens
        eos = tokenizer.eos_token_id if args.eos else model.config.vocab_size + 7
        autocast = precision == "bf16" and args.device == "cpu"
        # the paged cache takes the weights' dtype: no autocast over float32 weights (docs/rollouts.md)
        engines = {name: build_engine(name, model) for name in args.backends
                   if name != ONE_CALL and not (autocast and name == "paged")}
        if ONE_CALL in args.backends:
            engines[ONE_CALL] = build_engine("generate", model)
            engines[ONE_CALL].segment_tokens = None
        for n_rows in args.rows:
            prompts = all_prompts[:n_rows]
            params = SamplingParams(max_new_tokens=args.tokens, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id, temperature=1.0)
            times: dict[str, list[float]] = {name: [] for name in engines}
            generated: dict[str, int] = {name: 0 for name in engines}
            first: dict[str, float] = {}
            torch.manual_seed(0)
            for round_ in range(args.repeats + 1):
                for name, engine in engines.items():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        out = engine.generate(prompts, params)
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        seconds = time.perf_counter() - start
                    assert args.eos or sum(out.lengths) == n_rows * args.tokens, (name, out.lengths)
                    if round_:  # round 0 is the warm-up
                        times[name].append(seconds)
                        generated[name] += sum(out.lengths)
                    else:
                        first[name] = seconds
                    print(f"  {precision} {n_rows} rows {name}: {seconds:.2f} s, {sum(out.lengths)} tokens",
                          flush=True)
            if args.profile:
                for name, engine in engines.items():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                        print_profile(f"{precision} {n_rows} rows {name}", lambda: engine.generate(prompts, params),
                                      args.profile)
            base = statistics.median(times[next(iter(engines))])
            for name, values in times.items():
                median = statistics.median(values)
                results.append({"precision": precision, "rows": n_rows, "backend": name, "median_s": median,
                                "all_s": values, "first_call_extra_s": first[name] - median,
                                "tokens_per_s": generated[name] / sum(values), "vs_first": base / median,
                                "mean_length": generated[name] / len(values) / n_rows})
        del engines, model

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    random_weights = args.device == "cuda" or args.model != "embedded" or args.config_dir is not None
    print(f"\n{args.model} model{' shape, random weights' if random_weights else ''}, {args.device} ({device}), "
          f"{args.tokens} new tokens per row{' at most (EOS on)' if args.eos else ''}, prompts "
          f"{min(map(len, all_prompts))}-{max(map(len, all_prompts))} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating rounds\n")
    first_backend = results[0]["backend"] if results else args.backends[0]
    print(f"| precision | rows | backend | s per rollout | decode tokens/s | vs {first_backend} | first call extra s "
          "| mean completion tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['rows']} | `{r['backend']}` | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_first']:.2f}x | {r['first_call_extra_s']:.1f} | {r['mean_length']:.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
