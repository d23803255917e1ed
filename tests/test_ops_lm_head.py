"""The chunked output-head log-probs (ops/lm_head.py) against the plain path (the head's logits, then the
log-softmax): values and gradients, inside completion_logps, with tied and untied embeddings, LoRA, autocast,
FSDP2 over two processes; and no (tokens x vocabulary) tensor allocated in a DPO step."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.ops import lm_head, logprobs
from alignlab.ops.lm_head import chunked_head, head_label_logps, plain_head_reason
from alignlab.ops.logprobs import completion_logps, selective_log_softmax


def test_head_label_logps_hand_values():
    # hidden [1], weight rows [0], [log 3]: logits [0, log 3], probabilities [1/4, 3/4]
    # log p(1) = log(3/4) = -0.2876820724517809; entropy = -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446188083
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logp, entropy = head_label_logps(hidden, weight, None, torch.tensor([1]), with_entropy=True)
    assert logp.item() == pytest.approx(-0.2876820724517809, abs=1e-7)
    assert entropy.item() == pytest.approx(0.5623351446188083, abs=1e-7)
    # temperature 0.5 doubles the logits: [0, 2 log 3], probabilities [1/10, 9/10]; log(1/10) = -2.302585092994046
    # a bias of [log 2, 0] then makes them [log 2, log 9]: probabilities [2/11, 9/11]; log(2/11) = -1.7047480922384253
    assert head_label_logps(hidden, weight, None, torch.tensor([0]), temperature=0.5).item() == pytest.approx(
        -2.302585092994046, abs=1e-6)
    bias = torch.tensor([math.log(2.0) / 2, 0.0])  # divided by the temperature too
    assert head_label_logps(hidden, weight, bias, torch.tensor([0]), temperature=0.5).item() == pytest.approx(
        -1.7047480922384253, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        head_label_logps(hidden, weight, None, torch.tensor([0]), temperature=0.0)
    with pytest.raises(ValueError, match="expected"):
        head_label_logps(hidden, weight.T, None, torch.tensor([0]))


def _plain(hidden, weight, bias, labels, temperature):
    """The plain path: the whole logits, then the log-softmax and the entropy from them."""
    logits = F.linear(hidden, weight, bias) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [60, 1 << 22])  # blocks of tokens and of vocabulary entries; one block
def test_values_and_gradients_match_the_plain_path(dtype, atol, bias, chunk):
    torch.manual_seed(0)
    n, h, v, temperature = 23, 16, 301, 0.7
    hidden = (torch.randn(n, h, dtype=dtype) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,))
    g_logp, g_entropy = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)  # arbitrary per-token gradients
    params = [t for t in (hidden, weight, b) if t is not None]

    logp, entropy = head_label_logps(hidden, weight, b, labels, temperature=temperature, with_entropy=True,
                                     chunk_elements=chunk)
    got = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), params)
    ref_logp, ref_entropy = _plain(hidden, weight, b, labels, temperature)
    expected = torch.autograd.grad((ref_logp * g_logp + ref_entropy * g_entropy).sum(), params, retain_graph=True)
    assert logp.dtype == dtype and torch.allclose(logp, ref_logp, atol=atol, rtol=0)
    assert torch.allclose(entropy, ref_entropy, atol=atol, rtol=0)
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, atol=atol, rtol=0), (a - e).abs().max()
    # log-probs alone (no entropy): the same values, and gradients through the log-probs only
    logp_only = head_label_logps(hidden, weight, b, labels, temperature=temperature, chunk_elements=chunk)
    assert torch.equal(logp_only, logp)
    got = torch.autograd.grad((logp_only * g_logp).sum(), params)
    expected = torch.autograd.grad((ref_logp * g_logp).sum(), params)
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, atol=atol, rtol=0)


def test_gradient_of_the_weight_only_and_of_nothing():
    torch.manual_seed(1)
    hidden, weight = torch.randn(5, 8), torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (5,))
    (grad,) = torch.autograd.grad(head_label_logps(hidden, weight, None, labels, chunk_elements=16).sum(), weight)
    (expected,) = torch.autograd.grad(_plain(hidden, weight, None, labels, 1.0)[0].sum(), weight)
    assert torch.allclose(grad, expected, atol=1e-5)
    with torch.no_grad():
        assert not head_label_logps(hidden, weight, None, labels).requires_grad


def test_bf16_autocast_matches_the_plain_path():
    """Under CPU bf16 autocast the head's matmul runs in bf16 as F.linear's does there, the log-softmax in
    float32; gradients come back in the parameters' float32."""
    torch.manual_seed(2)
    hidden = torch.randn(19, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.2).requires_grad_()
    labels = torch.randint(0, 500, (19,))
    g = torch.randn(19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = head_label_logps(hidden, weight, None, labels, chunk_elements=1000)
        logits = F.linear(hidden, weight)
        assert logits.dtype == torch.bfloat16
        ref = selective_log_softmax(logits, labels)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp, ref, atol=1e-5)  # the same bf16 logits, the same float32 log-softmax
    got = torch.autograd.grad((logp * g).sum(), (hidden, weight))
    expected = torch.autograd.grad((ref * g).sum(), (hidden, weight))
    for a, e in zip(got, expected):
        assert a.dtype == torch.float32
        # bf16 products (8 significant bits) summed in another order: agree to bf16 precision
        assert torch.allclose(a, e, atol=1e-2 * e.abs().max().item(), rtol=0), (a - e).abs().max()


# --------------------------------------------------------------------------------------------------------
# inside completion_logps


def _tiny_llama(tied: bool, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _batch(vocab: int = 300):
    torch.manual_seed(3)
    # right-padded rows: prompts of 5, 5 (the same: shared under padding_free) and 3 tokens, completions of 9, 6, 11
    input_ids = torch.randint(1, vocab, (3, 16))
    input_ids[1, :5] = input_ids[0, :5]
    lengths, prompts = [14, 11, 14], [5, 5, 3]
    attention_mask = (torch.arange(16) < torch.tensor(lengths)[:, None]).long()
    completion_mask = attention_mask * (torch.arange(16) >= torch.tensor(prompts)[:, None]).long()
    input_ids = input_ids * attention_mask
    return input_ids, attention_mask, completion_mask


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the chunked op, and makes its blocks small (several blocks of tokens and of
    vocabulary entries) so that the tests cover the block edges."""
    count = []
    original = lm_head.head_label_logps

    def counting(*args, **kwargs):
        count.append(1)
        return original(*args, **{**kwargs, "chunk_elements": 512})

    monkeypatch.setattr(lm_head, "head_label_logps", counting)
    return count


def _logps_and_grads(model, batch, temperature, padding_free, plain: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if plain:
            patch.setattr(logprobs, "plain_head_reason", lambda model, head: "forced")
        per_token, total = completion_logps(model, *batch, temperature=temperature, padding_free=padding_free)
    torch.manual_seed(4)
    coefficients = torch.randn(per_token.shape)  # an arbitrary gradient per token, as DPO / GRPO weights
    model.zero_grad()
    ((per_token * coefficients).sum() + total.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return per_token.detach(), grads


def _assert_same(model, monkeypatch, calls, temperature=0.7, padding_free=False, atol=1e-5):
    batch = _batch(model.config.vocab_size)
    got, got_grads = _logps_and_grads(model, batch, temperature, padding_free, False, monkeypatch)
    assert len(calls) == 1  # the chunked op ran, once
    expected, expected_grads = _logps_and_grads(model, batch, temperature, padding_free, True, monkeypatch)
    assert len(calls) == 1
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got - expected).abs().max()
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in got_grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=atol, rtol=0), (name, (grad - expected_grads[name]).abs().max())
    return got_grads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("padding_free", [False, True])
def test_completion_logps_chunked_equals_plain(tied, padding_free, monkeypatch, calls):
    model = _tiny_llama(tied)
    assert plain_head_reason(model, model.get_output_embeddings()) is None
    grads = _assert_same(model, monkeypatch, calls, padding_free=padding_free)
    if tied:  # one parameter: the head's gradient and the embedding's, accumulated together
        assert model.lm_head.weight is model.model.embed_tokens.weight and "lm_head.weight" not in grads
    else:
        assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads


def test_completion_logps_chunked_with_lora_on_attention(monkeypatch, calls):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(True), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    grads = _assert_same(model, monkeypatch, calls, temperature=1.3)
    assert grads and all("lora_" in name for name in grads)


def test_a_lora_wrapped_head_takes_the_plain_path(monkeypatch, calls):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                          init_lora_weights=False))
    head = model.get_output_embeddings()
    assert "not a plain Linear" in plain_head_reason(model, head)
    batch = _batch()
    per_token, _ = completion_logps(model, *batch)
    assert not calls
    expected = torch.log_softmax(model(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1].float(), -1)
    expected = expected.gather(-1, batch[0][:, 1:, None]).squeeze(-1) * (batch[2][:, 1:] * batch[1][:, 1:])
    assert torch.allclose(per_token, expected, atol=1e-5)


def test_feature_detection_of_changed_logits():
    model = _tiny_llama(True)
    head = model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    assert "soft-caps" in plain_head_reason(model, head)
    model.config.final_logit_softcapping = None
    model.config.logits_scaling = 8.0
    assert "logits_scaling" in plain_head_reason(model, head)
    model.config.logits_scaling = 1.0
    assert plain_head_reason(model, head) is None
    assert "no output embeddings" in plain_head_reason(model, None)


def test_a_model_that_changes_its_logits_gets_the_plain_path(monkeypatch, calls):
    """Not detected from the configuration: the output does not come back as it left the head, so the
    log-probs are computed again from the model's own logits, and the class keeps the plain path."""
    from transformers import LlamaForCausalLM

    class HalvedLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 2
            return out

    base = _tiny_llama(True)
    model = HalvedLogits(base.config)
    model.load_state_dict(base.state_dict())
    batch = _batch()
    for padding_free in (False, True):
        per_token, _ = completion_logps(model, *batch, padding_free=padding_free)
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1]
        expected = torch.log_softmax(logits, -1).gather(-1, batch[0][:, 1:, None]).squeeze(-1)
        assert torch.allclose(per_token, expected * batch[2][:, 1:], atol=1e-5)
    assert len(calls) == 1 and HalvedLogits in logprobs._LOGITS_CHANGED  # tried once, then plain at once


def test_chunked_head_restores_an_installed_forward():
    head = torch.nn.Linear(4, 10, bias=False)
    own = head.forward
    with chunked_head(head, torch.tensor([0, 2]), torch.tensor([1, 3])) as outputs:
        out = head(torch.randn(3, 4))
    assert out.shape == (1, 2, 1) and outputs == [out] and "forward" not in head.__dict__
    installed = lambda x: x  # noqa: E731 - e.g. alignlab.ops.linear's oneDNN forward
    head.forward = installed
    with chunked_head(head, torch.tensor([0]), torch.tensor([1]), with_entropy=True):
        assert head(torch.randn(1, 4)).shape == (1, 1, 2)
    assert head.forward is installed and own.__func__ is torch.nn.Linear.forward


# --------------------------------------------------------------------------------------------------------
# memory: a DPO step at 1,024 tokens allocates nothing of tokens x vocabulary entries


def test_no_tokens_by_vocabulary_tensor_in_a_dpo_step(tiny_model_dir, pairs_file, tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from alignlab.algorithms.dpo import DPOConfig, DPOTrainer
    from alignlab.data.preference import collate_pairs
    from tests.conftest import tiny_config

    class LargestAllocation(TorchDispatchMode):
        """The most elements any operator's floating-point output holds in its own storage (views of another
        tensor's storage count that storage, which its own operator already recorded). Boolean masks are left
        out: the shared-prompt attention mask is (rows x width x width) bools, quadratic in the length."""

        def __init__(self):
            super().__init__()
            self.largest, self.op = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    size = t.untyped_storage().nbytes() // t.element_size()
                    if size > self.largest:
                        self.largest, self.op = size, str(func)
            return out

    trainer = DPOTrainer(tiny_config(DPOConfig, tiny_model_dir, pairs_file, tmp_path / "out", max_length=1024))
    vocab = trainer.policy.config.vocab_size
    torch.manual_seed(0)
    examples = []
    for prompt, chosen, rejected in [(24, 1000, 990), (40, 984, 700)]:
        ids = torch.randint(3, vocab, (prompt + chosen + rejected,)).tolist()
        examples.append({"chosen_input_ids": ids[: prompt + chosen], "chosen_completion_mask": [0] * prompt + [1] * chosen,
                         "rejected_input_ids": ids[:prompt] + ids[prompt + chosen :],
                         "rejected_completion_mask": [0] * prompt + [1] * rejected})
    batch = collate_pairs(examples, trainer.tokenizer.pad_token_id)
    tokens = int(batch["completion_mask"][:, 1:].sum())
    assert batch["input_ids"].shape[1] == 1024 and tokens > 3600
    trainer.policy.train()
    with LargestAllocation() as mode:
        loss = trainer.compute_loss(trainer.policy, batch)[0][0]
        loss.backward()
    assert math.isfinite(loss.item())
    assert trainer.policy.lm_head.weight.grad is not None
    # tokens x V is about 3,700 x 49,152 = 182M elements (the plain path's logits); the largest tensors here are
    # the shared-prompt attention mask as floats (2 rows x 2,014^2 = 8.1M), one block of logits (4M) and the
    # embedding's gradient (V x 64 = 3.1M)
    assert mode.largest * 16 < tokens * vocab, (mode.largest, mode.op)


# --------------------------------------------------------------------------------------------------------
# FSDP2 over two processes (gloo on CPU)

_FSDP_SCRIPT = """
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from alignlab.ops import lm_head, logprobs
from alignlab.ops.logprobs import completion_logps
from alignlab.train.config import TrainConfig
from alignlab.train.distributed import initialize, is_sharded, set_wrap_classes, shutdown
from alignlab.train.runtime import build_runtime

path, out = sys.argv[1], sys.argv[2]
result = lambda line: os.write(1, f"RESULT {line}\\n".encode())  # one write: the processes' lines never mix
acc = build_runtime(TrainConfig(model_name_or_path=path, dataset_name="builtin:concise", output_dir=out,
                                    fsdp="full_shard auto_wrap", bf16=False)).accelerator
model = AutoModelForCausalLM.from_pretrained(path)  # tied embeddings
whole = AutoModelForCausalLM.from_pretrained(path)
set_wrap_classes(acc, model)
model = acc.prepare(model)
initialize(model)
assert is_sharded(model)

def batch(rank):
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, 1000, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    completion = (torch.arange(24) >= 6 + 3 * rank).long().expand(2, 24) * mask
    coefficients = torch.randn(2, 23, generator=g)
    return ids * mask, mask, completion, coefficients

calls = []
chunked = lm_head.head_label_logps
lm_head.head_label_logps = lambda *a, **k: calls.append(1) or chunked(*a, **{**k, "chunk_elements": 1 << 16})
ids, mask, completion, coefficients = batch(acc.process_index)
per_token, total = completion_logps(model, ids, mask, completion, temperature=0.7, padding_free=True)
((per_token * coefficients).sum() + total.sum()).backward()
assert len(calls) == 1

# the whole model, plain path, both processes' batches: FSDP2 averages the gradients over the processes
logprobs.plain_head_reason = lambda model, head: "forced"
expected_logps = None
for rank in range(2):
    ids, mask, completion, coefficients = batch(rank)
    plain, plain_total = completion_logps(whole, ids, mask, completion, temperature=0.7, padding_free=True)
    (((plain * coefficients).sum() + plain_total.sum()) / 2).backward()
    if rank == acc.process_index:
        expected_logps = plain.detach()
assert len(calls) == 1
logps_diff = (per_token.detach() - expected_logps).abs().max().item()
expected = dict(whole.named_parameters())
grad_diff, names = 0.0, 0
for name, p in model.named_parameters():
    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    grad_diff = max(grad_diff, (grad - expected[name].grad).abs().max().item())
    names += 1
result(f"{acc.process_index} {logps_diff} {grad_diff} {names}")
shutdown(True)  # both processes leave together (an abort at exit otherwise, sometimes)
"""


@pytest.mark.integration
def test_chunked_head_under_fsdp2(tiny_model_dir, tmp_path):
    """The tiny model (tied embeddings) sharded with FSDP2 over two processes: the chunked head runs inside the
    head's forward on the gathered weight; log-probs and the (averaged) gradients of every parameter equal the
    whole model's through the plain path."""
    from tests.test_distributed import _env

    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(_FSDP_SCRIPT)
    from tests.conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), tiny_model_dir, str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(r[0] for r in results) == ["0", "1"], proc.stdout[-3000:]
    for _, logps_diff, grad_diff, names in results:
        assert float(logps_diff) < 1e-5 and float(grad_diff) < 1e-5 and int(names) > 10
