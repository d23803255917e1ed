"""Linear layers from oneDNN-reordered weights during decoding (alignlab.ops.linear)."""

import pytest
import torch

from alignlab.ops.linear import onednn_linear_available, reordered_linear_weights

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear")


def _switched(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@needs_onednn
def test_reordered_layers_match_and_are_restored():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(3, 5, 8)
    expected = model(x)
    with torch.no_grad(), reordered_linear_weights(model, rows=3) as count:
        assert count == 2 and _switched(model) == ["0", "2"]
        got = model(x)
        # a non-contiguous input and another row count
        assert torch.allclose(model(x.transpose(0, 1)), expected.transpose(0, 1), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert _switched(model) == []
    # restored on an error too
    with pytest.raises(RuntimeError, match="boom"), reordered_linear_weights(model, rows=3):
        raise RuntimeError("boom")
    assert _switched(model) == []


@needs_onednn
def test_falls_back_where_the_copy_could_differ():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with reordered_linear_weights(layer, rows=2):
        layer.weight.data.mul_(2)  # the copy does not see this: only the layer's own forward does
        own = torch.nn.functional.linear(x, layer.weight, layer.bias)
        # gradients recorded: own forward, differentiable
        y = layer(x)
        assert y.requires_grad and torch.allclose(y, own)
        with torch.no_grad():
            assert not torch.allclose(layer(x), own)  # the reordered copy (the weight before the change)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer(x).dtype == torch.bfloat16
            with pytest.raises(RuntimeError, match="same dtype"):  # nn.Linear's own error for a float64 input
                layer(x.double())


def test_leaves_other_layers_alone():
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    subclass = type("MyLinear", (torch.nn.Linear,), {})(8, 4)
    model = torch.nn.ModuleList([layer, subclass, torch.nn.Embedding(4, 8)])
    with reordered_linear_weights(model, rows=1) as count:
        assert count == 0 and _switched(model) == []


@needs_onednn
def test_sampling_decodes_from_the_reordered_weights(tiny_model_dir, tiny_tokenizer):
    from alignlab.models import load_causal_lm
    from alignlab.rollout.generation import sample_completions

    model = load_causal_lm(tiny_model_dir).eval()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append("forward" in m.__dict__))
    prompts = [tiny_tokenizer("Hello there")["input_ids"], tiny_tokenizer("Hi")["input_ids"]]
    sample_completions(model, prompts, max_new_tokens=3, eos_token_id=tiny_tokenizer.eos_token_id,
                       pad_token_id=tiny_tokenizer.pad_token_id)
    assert seen and all(seen)
    assert _switched(model) == []
