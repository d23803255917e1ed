"""Completion log-probabilities against a direct full-vocabulary computation."""

import pytest
import torch

from alignlab.ops import logprobs
from alignlab.ops.logprobs import completion_logps, pack_rows, selective_log_softmax, target_token_logps


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    index = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), expected, atol=1e-6)
    # bf16 logits are upcast before normalising
    got = selective_log_softmax(logits.bfloat16(), index)
    assert got.dtype == torch.float32


def test_selective_log_softmax_hand_value():
    # logits [0, log 3] -> probabilities [1/4, 3/4]; log(3/4) = -0.2876820724...
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()]]])
    assert selective_log_softmax(logits, torch.tensor([[1]])).item() == pytest.approx(-0.2876820724517809)
    # temperature 0.5 doubles the logits: [0, 2 log 3] -> probabilities [1/10, 9/10]; log(9/10) = -0.1053605156...
    assert selective_log_softmax(logits, torch.tensor([[1]]), temperature=0.5).item() == pytest.approx(
        -0.10536051565782628)
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, torch.tensor([[1]]), temperature=0.0)


def _reference(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logps * completion_mask[:, 1:]


def _batch():
    # two right-padded rows: prompt 3 / completion 2, and prompt 2 / completion 4
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0], [11, 12, 13, 14, 15, 16]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    return input_ids, attention_mask, completion_mask


def test_completion_logps_matches_full_computation(tiny_model_dir):
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    input_ids, attention_mask, completion_mask = _batch()
    per_token, total = completion_logps(model, input_ids, attention_mask, completion_mask)
    expected = _reference(model, input_ids, attention_mask, completion_mask)
    assert per_token.shape == (2, 5)
    assert torch.allclose(per_token, expected, atol=1e-5)
    assert torch.allclose(total, expected.sum(1), atol=1e-4)
    # nothing outside the completion contributes
    assert (per_token[completion_mask[:, 1:] == 0] == 0).all()


def test_target_token_logps_matches_full_computation(tiny_model_dir):
    # SFT's targets: the same numbers as the full log-softmax at the target positions, in row-major order, and
    # the greedy hits of the full logits
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    input_ids, attention_mask, loss_mask = _batch()
    with torch.no_grad():
        token_logps, correct = target_token_logps(model, input_ids, attention_mask, loss_mask)
        expected = _reference(model, input_ids, attention_mask, loss_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # 2 + 4 targets
    assert token_logps.shape == (6,)
    assert torch.allclose(token_logps, expected[targets], atol=1e-5)
    assert torch.equal(correct, logits.argmax(-1)[targets] == input_ids[:, 1:][targets])


class _NoLogitsToKeep(torch.nn.Module):
    """A model whose forward does not take ``logits_to_keep``: the full-logits path must be used."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_completion_logps_without_logits_to_keep(tiny_model_dir):
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    batch = _batch()
    a, _ = completion_logps(model, *batch)
    b, _ = completion_logps(_NoLogitsToKeep(model), *batch)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_gradient_matches_autograd(dtype, temperature):
    # against autograd through log_softmax(logits / temperature), the way TRL computes PPO/GRPO log-probs
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=dtype)
    index = torch.randint(0, 7, (2, 4))
    weights = torch.randn(2, 4)
    a = logits.clone().requires_grad_(True)
    got = selective_log_softmax(a, index, temperature)
    (got * weights).sum().backward()
    b = logits.clone().float().requires_grad_(True)
    expected = torch.log_softmax(b / temperature, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(a.grad.float(), b.grad, atol=tol)
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, index, temperature), (logits.double().requires_grad_(True),)
    ) if dtype == torch.float32 else True


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_chunked_matches_unchunked(monkeypatch, dtype, temperature):
    # 3 x 5 tokens over a vocabulary of 7, in chunks of 2 tokens (the last chunk holds 1): values and
    # gradients equal the one-chunk computation
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=dtype)
    index = torch.randint(0, 7, (3, 5))
    weights = torch.randn(3, 5)

    def run():
        x = logits.clone().requires_grad_(True)
        out = selective_log_softmax(x, index, temperature)
        (out * weights).sum().backward()
        return out, x.grad

    whole_out, whole_grad = run()
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 14)
    chunked_out, chunked_grad = run()
    assert torch.equal(whole_out, chunked_out)
    assert torch.equal(whole_grad, chunked_grad)
    expected = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chunked_out, expected, atol=1e-6)


def test_pack_rows_first_fit_decreasing():
    # lengths 5, 3, 4, 2 into rows of 7: sorted 5(0), 4(2), 3(1), 2(3)
    # 5 -> row0 (room 2); 4 -> row1 (room 3); 3 -> row1 (room 0); 2 -> row0 (room 0)
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([7, 7], 7) == [[0], [1]]


def test_padding_free_matches_padded(tiny_model_dir):
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    # lengths 3, 5, 8 in width 8: packed as [8] and [5, 3], so two sequences share a row
    input_ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [9, 10, 11, 12, 13, 0, 0, 0], [20, 21, 22, 23, 24, 25, 26, 27]])
    attention_mask = (torch.arange(8) < torch.tensor([[3], [5], [8]])).long()
    completion_mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    for batch in (_batch(), (input_ids, attention_mask, completion_mask)):
        a, sa = completion_logps(model, *batch)
        b, sb = completion_logps(model, *batch, padding_free=True)
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(sa, sb, atol=1e-4)


def test_padding_free_gradients_match(tiny_model_dir):
    from alignlab.models import load_causal_lm

    grads = []
    for padding_free in (False, True):
        model = load_causal_lm(tiny_model_dir)
        _, total = completion_logps(model, *_batch(), padding_free=padding_free)
        total.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def _shared_prompt_batch():
    """Rows 0, 1 and 3 share the prompt [5, 6, 7]; row 2 has its own prompt [9, 10]."""
    rows = [([5, 6, 7], [30, 31]), ([5, 6, 7], [40, 41, 42, 43]), ([9, 10], [50]), ([5, 6, 7], [60])]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


def test_shared_prompt_layout_by_hand():
    from alignlab.ops.logprobs import shared_prompt_inputs

    packed, positions, mask, flat_index = shared_prompt_inputs(*_shared_prompt_batch(), 0, "sdpa")
    # group [5, 6, 7] + 30 31 + 40 41 42 43 + 60 is 10 tokens (one row); group [9, 10] + 50 is 3 (row of its own)
    assert packed.tolist() == [[5, 6, 7, 30, 31, 40, 41, 42, 43, 60], [9, 10, 50, 0, 0, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    # token 41 (index 6) sees the prompt and 40, 41; not 30 31
    assert mask[0, 0, 6].tolist() == [True, True, True, False, False, True, True, False, False, False]
    # token 60 (index 9) sees the prompt and itself only
    assert mask[0, 0, 9].tolist() == [True, True, True] + [False] * 6 + [True]
    # the filler of row 1 sees nothing of the real tokens
    assert not mask[1, 0, 3:, :3].any()
    # row 3 = [5, 6, 7, 60]: its prompt is the shared copy, its completion at index 9
    assert flat_index[3, :4].tolist() == [0, 1, 2, 9]
    assert flat_index[2, :3].tolist() == [10, 11, 12]
    # nothing shared: no layout
    ids, am, cm = _shared_prompt_batch()
    assert shared_prompt_inputs(ids[1:3], am[1:3], cm[1:3], 0, "sdpa") is None
    assert shared_prompt_inputs(ids, am, cm, 0, "flash_attention_2") is None
    # a group (10 tokens) longer than a sliding attention window: no sharing
    assert shared_prompt_inputs(ids, am, cm, 0, "sdpa", max_width=9) is None
    assert shared_prompt_inputs(ids, am, cm, 0, "sdpa", max_width=10) is not None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompts_give_the_unshared_logps_and_gradients(tiny_model_dir, attn):
    from alignlab.models import load_causal_lm

    batch = _shared_prompt_batch()
    results = []
    for share in (False, True):
        model = load_causal_lm(tiny_model_dir)
        model.set_attn_implementation(attn)
        per_token, total = completion_logps(model, *batch, padding_free=True, share_prompts=share)
        total.sum().backward()
        results.append((per_token.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert (results[0][0] != 0).sum() == 8  # every completion token scored
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)
