"""Linear layers from oneDNN-reordered weights during decoding (alignlab.ops.linear)."""

import pytest
import torch

from alignlab.ops.linear import onednn_float32_linear, onednn_linear_available, reordered_linear_weights

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
    layer = torch.nn.Linear(8, 4).to(torch.float64)
    subclass = type("MyLinear", (torch.nn.Linear,), {})(8, 4)
    model = torch.nn.ModuleList([layer, subclass, torch.nn.Embedding(4, 8)])
    with reordered_linear_weights(model, rows=1) as count:
        assert count == 0 and _switched(model) == []
    with torch.autocast("cpu", dtype=torch.float16), reordered_linear_weights(torch.nn.Linear(8, 4), rows=1) as count:
        assert count == 0  # no copies for float16 autocast


needs_bf16 = pytest.mark.skipif(not onednn_linear_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="oneDNN has no bf16 on this CPU")


@needs_bf16
def test_bf16_copies_under_autocast_and_for_bf16_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        with reordered_linear_weights(model, rows=3) as count:
            got = model(x)
    assert count == 2 and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
    # a bf16 copy serves only bf16 calls: without autocast a float32 input runs the layer's own forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), reordered_linear_weights(model, rows=3):
        with torch.autocast("cpu", enabled=False):
            assert torch.allclose(model(x), model[2](model[1](torch.nn.functional.linear(x, model[0].weight,
                                                                                      model[0].bias))))
    # bf16 weights without autocast (the rollout sampler's copy)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x.bfloat16())
        with reordered_linear_weights(model, rows=3) as count:
            got = model(x.bfloat16())
    assert count == 2 and torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2)


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


# ---------------------------------------------------------------------------------------------------------
# onednn_float32_linear: training and scoring forwards


def _grads(model, x, loss_fn):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    out = model(x)
    loss_fn(out).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@needs_onednn
@pytest.mark.parametrize("shape", [(6, 8), (2, 5, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_float32_linear_matches_values_and_gradients(shape, bias):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), torch.nn.Tanh(), torch.nn.Linear(16, 3, bias=bias))
    x = torch.randn(*shape, requires_grad=True)
    weights = torch.randn(*shape[:-1], 3)

    def loss_fn(out):  # a non-contiguous gradient reaches the last layer
        return (out * weights).transpose(0, -1).sum()

    expected = _grads(model, x, loss_fn)
    with onednn_float32_linear() as switched:
        assert switched
        got = _grads(model, x, loss_fn)
        assert model[0](x).grad_fn.name() == "_OneDNNLinearBackward"
    assert model[0](x).grad_fn.name() != "_OneDNNLinearBackward"
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    assert torch.allclose(got[1], expected[1], atol=1e-6)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        assert torch.allclose(got[2][name], grad, atol=1e-5), name


@needs_onednn
def test_onednn_float32_linear_frozen_parts_and_no_grad():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with onednn_float32_linear():
        with torch.no_grad():
            y = layer(x)
        assert not y.requires_grad and torch.allclose(y, expected, atol=1e-6)
        # frozen layer, input needing its gradient (a reference model under LoRA, the first layers' inputs)
        layer.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        layer(xg).sum().backward()
        assert torch.allclose(xg.grad, layer.weight.sum(0).expand(3, 8), atol=1e-6)
        # trainable layer, input without gradient: weight and bias gradients only
        layer.requires_grad_(True)
        layer(x).pow(2).sum().backward()
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(layer.state_dict())
    reference(x).pow(2).sum().backward()
    assert torch.allclose(layer.weight.grad, reference.weight.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, reference.bias.grad, atol=1e-5)


@needs_onednn
def test_onednn_float32_linear_falls_back_and_nests():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.float64))
    x = torch.randn(2, 8, requires_grad=True)
    own_forward = torch.nn.Linear.forward
    with onednn_float32_linear() as switched:
        assert switched and torch.nn.Linear.forward is not own_forward
        with onednn_float32_linear() as nested:  # a nested block changes nothing and restores nothing
            assert not nested
        assert torch.nn.Linear.forward is not own_forward
        assert model[0](x).grad_fn.name() == "_OneDNNLinearBackward"
        assert model[1](x.double()).grad_fn.name() != "_OneDNNLinearBackward"  # float64: the layer's own
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model[0](x).dtype == torch.bfloat16  # autocast's own forward
        x0 = x.detach()[0]
        assert torch.allclose(model[0](x0), torch.nn.functional.linear(x0, model[0].weight, model[0].bias))
        with torch.no_grad(), reordered_linear_weights(model, rows=2) as reordered:
            assert reordered == 1 and "forward" in model[0].__dict__
            y = model[0](x)
        assert "forward" not in model[0].__dict__  # decoding's switch gives the class's (training) one back
        assert torch.allclose(y, torch.nn.functional.linear(x, model[0].weight, model[0].bias), atol=1e-6)
        with pytest.raises(RuntimeError, match="boom"), reordered_linear_weights(model, rows=2):
            raise RuntimeError("boom")
        assert "forward" not in model[0].__dict__
    assert torch.nn.Linear.forward is own_forward
    with pytest.raises(RuntimeError, match="boom"), onednn_float32_linear():
        raise RuntimeError("boom")
    assert torch.nn.Linear.forward is own_forward
