"""Sampling with generate, the layout of prompt+completion rows, and the alignment of per-token log-probs and
values with the completion tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.data.sequences import build_sequences, slice_rows
from alignlab.models import load_causal_lm, load_reward_model
from alignlab.rollout.generation import InverseCDFSampling, completion_token_logps, sample_completions, token_values
from alignlab.rollout.scoring import sequence_scores, token_scores


def test_build_sequences_layout_by_hand():
    seq = build_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_token_id=0)
    assert seq["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert seq["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert seq["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    # completion token j of row i is predicted at shifted position len(prompt_i) - 1 + j
    # row 0: 2, 3, (4 -> padding, clamped to T - 2 = 3); row 1: 0, 1, 2
    assert seq["completion_index"].tolist() == [[2, 3, 3], [0, 1, 2]]
    assert seq["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_slice_rows_trims_to_the_longest_selected_row():
    seq = build_sequences([[1, 2, 3], [4]], [[5, 6], [7]], pad_token_id=0)
    one = slice_rows(seq, torch.tensor([1]))
    assert one["input_ids"].tolist() == [[4, 7]]
    assert one["completion_index"].tolist() == [[0, 0]] and one["response_mask"].tolist() == [[1, 0]]


def test_logps_and_values_line_up_with_the_completion_tokens(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_dir).eval()
    critic = load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).eval()
    # lengths 5, 3 and 2: packed, the last two share a row
    prompts, completions = [[11, 12, 13], [21], [51]], [[31, 32], [41, 42], [61]]
    seq = build_sequences(prompts, completions, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        for padding_free in (False, True):
            logps = completion_token_logps(policy, seq, temperature=0.7, padding_free=padding_free, pad_token_id=0)
            for i, (p, c) in enumerate(zip(prompts, completions)):
                logits = policy(torch.tensor([p + c])).logits[0] / 0.7
                expected = [F.log_softmax(logits[len(p) - 1 + j], -1)[tok] for j, tok in enumerate(c)]
                assert torch.allclose(logps[i, : len(c)], torch.stack(expected), atol=1e-4)
                assert (logps[i, len(c):] == 0).all()
        for padding_free in (False, True):
            values = token_values(critic, seq, padding_free=padding_free, pad_token_id=0)
            for i, (p, c) in enumerate(zip(prompts, completions)):
                hidden = critic.model(torch.tensor([p + c])).last_hidden_state[0]
                expected = critic.score(hidden)[len(p) - 1 : len(p) - 1 + len(c), 0]
                assert torch.allclose(values[i, : len(c)], expected, atol=1e-4)
                assert (values[i, len(c):] == 0).all()


def test_packed_scores_match_padded_ones_and_zero_the_padding(tiny_model_dir, tiny_tokenizer):
    critic = load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).eval()
    seq = build_sequences([[11, 12, 13], [21], [51]], [[31, 32], [41, 42], [61]], tiny_tokenizer.pad_token_id)
    ids, mask = seq["input_ids"], seq["attention_mask"]
    with torch.no_grad():
        padded = token_scores(critic, ids, mask)
        packed = token_scores(critic, ids, mask, padding_free=True, pad_token_id=0)
        assert torch.allclose(packed[mask.bool()], padded[mask.bool()], atol=1e-5)
        assert (packed[~mask.bool()] == 0).all()
        assert torch.allclose(sequence_scores(critic, ids, mask, padding_free=True), sequence_scores(critic, ids, mask),
                              atol=1e-5)
        # left-padded rows cannot be packed: the padded forward runs instead, same scores
        left = torch.tensor([[0, 0, 21, 41, 42], [11, 12, 13, 31, 32]])
        left_mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
        assert torch.allclose(sequence_scores(critic, left, left_mask, padding_free=True),
                              sequence_scores(critic, left, left_mask))


def test_sampling_cuts_after_the_first_eos(tiny_model_dir, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    model = load_causal_lm(tiny_model_dir).eval()
    torch.manual_seed(0)
    prompts = [[1, 2, 3], [4, 5]]
    out = sample_completions(
        model, prompts, max_new_tokens=6, eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id,
        temperature=1.0, num_generations=3, batch_size=1,
    )
    assert len(out.ids) == 6 and out.prompt_index == [0, 0, 0, 1, 1, 1]
    for ids, has_eos in zip(out.ids, out.has_eos):
        assert 1 <= len(ids) <= 6
        assert has_eos == (eos in ids)
        if has_eos:
            assert ids.index(eos) == len(ids) - 1
    # force EOS with a large logit bias on it: every completion then is exactly [eos]
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 1e4
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    forced = sample_completions(model, prompts, max_new_tokens=4, eos_token_id=eos, pad_token_id=0, temperature=0.01)
    assert forced.ids == [[eos], [eos]] and forced.has_eos == [True, True]


@pytest.mark.parametrize("kw, message", [({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_sampling_settings(tiny_model_dir, kw, message):
    args = dict(max_new_tokens=2, eos_token_id=2, pad_token_id=2)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        sample_completions(torch.nn.Linear(1, 1), [[1]], **args)


def test_inverse_cdf_sampling_draws_from_the_softmax():
    # two rows; row 0: p = softmax(log [0.1, 0.2, 0.3, 0.4, 0]) = (0.1, 0.2, 0.3, 0.4, 0), token 4 impossible
    #           row 1: p = (0, 0, 0, 1, 0) after a -inf mask everywhere else
    scores = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5]]))
    scores[1] = torch.tensor([-math.inf, -math.inf, -math.inf, 3.0, -math.inf])
    sampler = InverseCDFSampling()
    torch.manual_seed(0)
    n = 20_000
    counts = torch.zeros(2, 5)
    for _ in range(n):
        out = sampler(None, scores)
        tokens = out.argmax(dim=1)
        assert (out.isfinite().sum(dim=1) == 1).all() and (out.gather(1, tokens[:, None]) == 0).all()
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    freq = counts / n
    # binomial standard error at p = 0.4, n = 20000: 0.0035; 0.015 is more than 4 of them
    assert torch.allclose(freq[0], torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]), atol=0.015)
    assert counts[0, 4] == 0 and freq[1].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    # the recorded log-probs are those of the drawn tokens: log 0.1 .. log 0.4, and log 1 = 0 in row 1
    logps = torch.cat(sampler.logps, dim=1)  # (2, n)
    assert {round(p, 4) for p in logps[0].exp().tolist()} == {0.1, 0.2, 0.3, 0.4}
    assert (logps[1] == 0).all()


def test_greedy_sampling_takes_the_argmax_and_its_logp(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir).eval()
    prompt = [11, 12, 13]
    out = sample_completions(model, [prompt], max_new_tokens=3, eos_token_id=10**6, pad_token_id=0,
                             do_sample=False, return_logps=True, generation_backend="generate")
    ids, expected_logps = list(prompt), []
    with torch.no_grad():
        for _ in range(3):
            logp = F.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            ids.append(int(logp.argmax()))
            expected_logps.append(float(logp.max()))
    assert out.ids == [ids[3:]] and out.has_eos == [False]
    assert torch.allclose(torch.tensor(out.logps[0]), torch.tensor(expected_logps), atol=1e-4)
    with pytest.raises(ValueError, match="generation_backend"):
        sample_completions(model, [prompt], max_new_tokens=1, eos_token_id=2, pad_token_id=0,
                           generation_backend="vllm")
