"""Completion log-probabilities against a direct full-vocabulary computation."""

import pytest
import torch

from alignlab.ops.logprobs import completion_logps, pack_rows, selective_log_softmax


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_gradient_matches_autograd(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=dtype)
    index = torch.randint(0, 7, (2, 4))
    weights = torch.randn(2, 4)
    a = logits.clone().requires_grad_(True)
    (selective_log_softmax(a, index) * weights).sum().backward()
    b = logits.clone().float().requires_grad_(True)
    expected = torch.log_softmax(b, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(a.grad.float(), b.grad, atol=tol)
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, index), (logits.double().requires_grad_(True),)
    ) if dtype == torch.float32 else True


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
