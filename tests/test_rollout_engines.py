"""Generation engines (``--generation_backend``): the same greedy completions on every backend, log-probs equal to
the training forward's, continuous batching's slot reuse, and weight updates seen by every engine."""

import pytest
import torch

from alignlab.errors import UserError
from alignlab.rollout.engines import (
    AUTO,
    AUTO_UNDER_AUTOCAST,
    BACKENDS,
    GenerateEngine,
    PagedEngine,
    SamplingParams,
    build_engine,
    engine_for,
    resolve_backend,
)
from alignlab.data.sequences import build_sequences
from alignlab.rollout.generation import completion_token_logps

EOS, PAD = 2, 0
NO_EOS = 10_000  # outside the vocabulary: never generated
# the static engine compiles (TorchInductor's C++ kernels): 20-40 s per new shape on a 2-core CPU
ENGINES = ["generate", pytest.param("static", marks=pytest.mark.integration), "paged"]


@pytest.fixture(scope="module")
def model():
    """A 2-layer Llama with a 512-token vocabulary and an untied head, so that greedy
    completions vary from token to token (a small random tied model mostly repeats its last token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=PAD)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[5, 6, 7], list(range(100, 140)), [9], [300, 301, 302, 303, 304, 305, 306]]


def greedy(max_new_tokens=10, eos=EOS, **kw):
    return SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD, do_sample=False,
                          return_logps=True, **kw)


@pytest.mark.parametrize("name", ENGINES)
def test_greedy_completions_are_identical_on_every_backend(model, name):
    reference = GenerateEngine(model).generate(PROMPTS, greedy())
    # a model that says something: several distinct tokens per completion
    assert all(len(set(ids)) >= 3 for ids in reference.ids)
    out = build_engine(name, model).generate(PROMPTS, greedy(num_generations=2))
    assert out.ids == [ids for ids in reference.ids for _ in range(2)], name
    assert out.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    for got, want in zip(out.logps, [r for r in reference.logps for _ in range(2)]):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), name


@pytest.mark.parametrize("name", ENGINES)
def test_sampled_logps_match_the_training_forward(model, name):
    params = SamplingParams(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=0.7,
                            num_generations=3, return_logps=True)
    torch.manual_seed(1)
    out = build_engine(name, model).generate(PROMPTS, params)
    assert len(out.ids) == 12 and all(len(ids) == len(lp) for ids, lp in zip(out.ids, out.logps))
    assert len({tuple(ids) for ids in out.ids}) > 4  # sampled, not greedy
    seq = build_sequences([PROMPTS[i] for i in out.prompt_index], out.ids, PAD)
    with torch.no_grad():
        for padding_free in (False, True):
            rescored = completion_token_logps(model, seq, temperature=0.7, padding_free=padding_free, pad_token_id=PAD)
            returned = torch.zeros_like(rescored)
            for i, row in enumerate(out.logps):
                returned[i, : len(row)] = torch.tensor(row)
            assert (returned - rescored).abs().max() < 1e-4


def test_generate_drops_finished_rows_between_segments(model, monkeypatch):
    from transformers import DynamicCache

    long = GenerateEngine(model).generate(PROMPTS, greedy(max_new_tokens=30, eos=NO_EOS))
    # an "EOS" that the rows first reach in different 4-token segments, and that one row never reaches
    def first_segments(token):
        return [ids.index(token) // 4 if token in ids else None for ids in long.ids]
    eos = next(t for t in sorted({t for ids in long.ids for t in ids})
               if None in first_segments(t) and len({s for s in first_segments(t) if s is not None}) >= 2)
    selected = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda cache, indices: (selected.append(indices.tolist()), select(cache, indices))[1])
    segmented_engine, whole_engine = GenerateEngine(model), GenerateEngine(model)
    segmented_engine.segment_tokens, whole_engine.segment_tokens = 4, None
    params = greedy(max_new_tokens=30, eos=eos)
    segmented = segmented_engine.generate(PROMPTS, params)
    assert selected and len(selected[-1]) < len(PROMPTS)  # finished rows left the batch
    calls = len(selected)
    whole = whole_engine.generate(PROMPTS, params)
    assert len(selected) == calls  # one call: nothing dropped
    assert segmented.ids == whole.ids == [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in long.ids]
    assert segmented.has_eos == whole.has_eos and not all(segmented.has_eos)
    for got, want in zip(segmented.logps, whole.logps):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
    # sampled: the returned log-probs are the training forward's after rows have left the batch
    torch.manual_seed(3)
    sampled = segmented_engine.generate(PROMPTS, SamplingParams(
        max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD, num_generations=3, return_logps=True))
    assert len(selected) > calls and len(set(sampled.lengths)) >= 2  # rows left, others went on
    seq = build_sequences([PROMPTS[i] for i in sampled.prompt_index], sampled.ids, PAD)
    with torch.no_grad():
        rescored = completion_token_logps(model, seq, pad_token_id=PAD)
    returned = torch.zeros_like(rescored)
    for i, row in enumerate(sampled.logps):
        returned[i, : len(row)] = torch.tensor(row)
    assert (returned - rescored).abs().max() < 1e-4


def test_sampling_is_reproducible_from_the_seed(model):
    params = SamplingParams(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, num_generations=2)
    for name in ("generate", "paged"):
        engine = build_engine(name, model)
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(engine.generate(PROMPTS, params).ids)
        assert runs[0] == runs[1], name


def test_continuous_batching_reuses_slots(model):
    # two slots for eight prompts of 1 to 60 tokens; EOS is a token the greedy completions reach at different
    # steps, so completions finish early or at the length limit and waiting prompts take their slots
    prompts = [list(range(10, 10 + n)) for n in (1, 60, 3, 25, 2, 40, 7, 12)]
    singles = [GenerateEngine(model).generate([p], greedy(max_new_tokens=16, eos=NO_EOS)).ids[0] for p in prompts]

    def cut(ids, eos):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    # the first token of the completions that ends them at the most different lengths
    eos = max(sorted({t for ids in singles for t in ids}), key=lambda t: len({len(cut(ids, t)) for ids in singles}))
    expected = [cut(ids, eos) for ids in singles]
    lengths = {len(ids) for ids in expected}
    assert len(lengths) >= 3 and 16 in lengths  # some finish early, at different steps, some run to the limit

    rows_per_forward = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_forward.append(kwargs["position_ids"].shape[-1]), with_kwargs=True)
    try:
        out = PagedEngine(model, max_slots=2).generate(prompts, greedy(max_new_tokens=16, eos=eos))
    finally:
        hook.remove()
    assert out.ids == expected
    assert out.has_eos == [eos in ids for ids in expected]
    # decode forwards carry at most two sequences, and there were more of them than a 2-at-a-time padded
    # batch would need only if slots were handed on: 4 rounds of 2 would take sum of the pairs' longest
    decode_steps = [n for n in rows_per_forward if n <= 2]
    padded_rounds = sum(max(len(a), len(b)) for a, b in zip(expected[::2], expected[1::2]))
    assert decode_steps and len(rows_per_forward) < padded_rounds + len(prompts)


@pytest.mark.parametrize("name", ENGINES)
def test_engines_see_the_weights_after_an_optimizer_step(model, name):
    import copy

    policy = copy.deepcopy(model)
    engine = engine_for(policy, name)
    before = engine.generate(PROMPTS, greedy(max_new_tokens=5)).ids
    target = 77
    assert not all(ids == [target] * 5 for ids in before)
    # train the policy to say `target` after every prompt token, then sample again through the same engine
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    batch = torch.tensor([PROMPTS[3]])
    for _ in range(20):
        logits = policy(batch).logits
        loss = -torch.log_softmax(logits, -1)[..., target].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    assert engine_for(policy, name) is engine  # the same engine (and compiled graph), new weights
    after = engine.generate(PROMPTS, greedy(max_new_tokens=5)).ids
    assert after == GenerateEngine(policy).generate(PROMPTS, greedy(max_new_tokens=5)).ids
    assert after != before and sum(ids.count(target) for ids in after) >= 10


def test_backend_names():
    assert BACKENDS == ("auto", "generate", "static", "paged")
    assert resolve_backend("auto", "cpu") == AUTO["cpu"] and resolve_backend("paged", "cpu") == "paged"
    assert resolve_backend("auto", "cpu", autocast_differs=True) == AUTO_UNDER_AUTOCAST["cpu"] != "paged"
    assert resolve_backend("auto", "meta") == "generate"
    with pytest.raises(ValueError, match="generation_backend"):
        resolve_backend("vllm", "cpu")


def test_auto_leaves_paged_out_under_autocast_to_another_dtype(model):
    assert type(engine_for(model, "auto")).name == AUTO["cpu"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(engine_for(model, "auto")).name == AUTO_UNDER_AUTOCAST["cpu"]
        with pytest.raises(UserError, match="autocast"):
            PagedEngine(model).generate(PROMPTS, greedy())


def test_paged_names_the_transformers_release_it_needs(model, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    with pytest.raises(UserError, match=r"needs transformers >= 5\.19 \(installed: 5\.18\.0\)"):
        PagedEngine(model).generate(PROMPTS, greedy())


def test_generation_backend_flag_is_checked(tmp_path):
    from alignlab.experiments.evaluate import EvaluateConfig

    with pytest.raises(UserError, match="--generation_backend"):
        EvaluateConfig(task="concise", generation_backend="vllm")
