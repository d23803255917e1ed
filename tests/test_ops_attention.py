"""Per-sequence attention over one packed row (alignlab.ops.attention)."""

import pytest
import torch

from alignlab.ops.attention import SEGMENT_ATTENTION, segment_attention, segments_enabled, supports_segments
from alignlab.ops.logprobs import completion_logps, packed_forward_inputs, segment_inputs


class _Layer(torch.nn.Module):
    num_key_value_groups = 2


def test_segment_attention_is_each_sequence_on_its_own():
    # 2 query heads over 1 key/value head (GQA), sequences of 3 and 2 tokens in one row
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    out, weights = segment_attention(_Layer(), q, k, v, None, scaling=0.5, segment_lengths=[3, 2])
    assert weights is None and out.shape == (1, 5, 2, 4)  # (batch, tokens, heads, head_dim)
    for start, stop in ((0, 3), (3, 5)):
        kk, vv = k[:, :, start:stop].expand(1, 2, -1, -1), v[:, :, start:stop].expand(1, 2, -1, -1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop], kk, vv, is_causal=True, scale=0.5).transpose(1, 2)
        assert torch.allclose(out[:, start:stop], expected, atol=1e-6)
    # the first token of the second sequence sees only itself: its output is its own value
    assert torch.allclose(out[0, 3], v[0, 0, 3].expand(2, 4), atol=1e-6)
    with pytest.raises(ValueError, match="do not tile"):
        segment_attention(_Layer(), q, k, v, None, segment_lengths=[3, 1])


def test_segment_inputs_layout():
    input_ids = torch.tensor([[5, 6, 7, 0], [9, 10, 11, 12], [20, 0, 0, 0]])
    attention_mask = (torch.arange(4) < torch.tensor([[3], [4], [1]])).long()
    ids, positions, flat_index, lengths = segment_inputs(input_ids, attention_mask)
    assert ids.tolist() == [[5, 6, 7, 9, 10, 11, 12, 20]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert lengths == [3, 4, 1]
    assert flat_index[1].tolist() == [3, 4, 5, 6] and flat_index[2, 0] == 7


def test_supports_segments():
    from transformers import LlamaConfig, MistralConfig

    config = LlamaConfig()
    config._attn_implementation = "sdpa"
    assert supports_segments(config, 4096)
    config._attn_implementation = "eager"
    assert not supports_segments(config, 16)
    window = MistralConfig(sliding_window=8)
    window._attn_implementation = "sdpa"
    assert supports_segments(window, 8) and not supports_segments(window, 9)  # the window would be ignored


def test_segments_enabled_restores_the_attention_even_on_error():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError):
        with segments_enabled(config):
            assert config._attn_implementation == SEGMENT_ATTENTION
            raise RuntimeError
    assert config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_uses_segments_only_under_sdpa(tiny_model_dir, attn):
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    model.set_attn_implementation(attn)
    input_ids = torch.tensor([[5, 6, 7, 0], [9, 10, 11, 12]])
    attention_mask = (torch.arange(4) < torch.tensor([[3], [4]])).long()
    inputs, _, context = packed_forward_inputs(model, input_ids, attention_mask, pad_token_id=0)
    seen = []
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation))
    with context:
        model(**inputs, use_cache=False)
    handle.remove()
    if attn == "sdpa":
        assert seen == [SEGMENT_ATTENTION] and inputs["input_ids"].shape == (1, 7)
    else:
        assert seen == ["eager"] and inputs["input_ids"].shape == (2, 4)  # first-fit rows, no room to share
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_and_gradients_match_padded_rows(tiny_model_dir, attn):
    # lengths 3, 5, 8 in width 8; the completion log-probs and every parameter's gradient agree with the
    # padded batch, for the one-row segment layout (sdpa) and the first-fit rows (eager)
    from alignlab.models import load_causal_lm

    input_ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [9, 10, 11, 12, 13, 0, 0, 0], [20, 21, 22, 23, 24, 25, 26, 27]])
    attention_mask = (torch.arange(8) < torch.tensor([[3], [5], [8]])).long()
    completion_mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    results = []
    for padding_free in (False, True):
        model = load_causal_lm(tiny_model_dir)
        model.set_attn_implementation(attn)
        per_token, total = completion_logps(model, input_ids, attention_mask, completion_mask,
                                            padding_free=padding_free, temperature=0.7)
        (total * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((per_token.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert (results[0][0] != 0).sum() == 9
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


def test_gradient_checkpointing_keeps_the_gradients_right(tiny_model_dir):
    # checkpointed layers recompute their forward during backward, outside the forward's context: the
    # per-sequence attention must not be switched on there, or the recompute would attend across sequences
    from alignlab.models import load_causal_lm

    input_ids = torch.tensor([[5, 6, 7, 0, 0], [9, 10, 11, 12, 13]])
    attention_mask = (torch.arange(5) < torch.tensor([[3], [5]])).long()
    completion_mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    grads = []
    for padding_free in (False, True):
        model = load_causal_lm(tiny_model_dir).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _, total = completion_logps(model, input_ids, attention_mask, completion_mask, padding_free=padding_free)
        total.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
