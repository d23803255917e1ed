"""No ``(tokens x vocabulary)`` tensor is allocated in a training step (ops/lm_head.py, docs/memory.md): every
tensor an aten operation returns during a DPO step at length 1024, and during GRPO's log-probs of 1024-token
completions, forward and backward, is recorded by a ``TorchDispatchMode``; the largest allocation must stay far
below the logits of a single sequence. The tiny model has the embedded tokenizer's 49,152-entry vocabulary and a
hidden size of 64, so the logits (>= 1024 x 49,152 = 50M entries) stand out from every other tensor: the
embedding (3.1M), the head's vocabulary blocks (at most 4M), activations (tokens x 128)."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alignlab.algorithms.dpo import DPOConfig, train_dpo
from tests.conftest import tiny_config

LENGTH = 1024


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) that any aten operation returns, and which operation made it.
    Storage, not ``numel``: an ``expand`` view of a vector as ``(tokens, vocab)`` allocates nothing."""

    def __init__(self):
        super().__init__()
        self.elements, self.where, self.ops = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                elements = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
                if elements > self.elements:
                    self.elements, self.where = elements, f"{func} -> {tuple(tensor.shape)}"
        return out


def _limit(vocab: int) -> int:
    """A quarter of one sequence's logits: nothing else in these steps comes near (the module docstring)."""
    return LENGTH * vocab // 4


def test_the_counter_sees_the_plain_logits_and_the_backward(tiny_model_dir):
    # the control: the plain path (the model's own logits) trips the limit, and backward ops are seen
    from alignlab.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, LENGTH))
    with LargestAllocation() as counter:
        model(ids).logits.log_softmax(-1)[0, :, 0].sum().backward()
    assert counter.elements >= LENGTH * model.config.vocab_size > _limit(model.config.vocab_size)
    assert "embedding_dense_backward" in counter.ops


@pytest.mark.parametrize("padding_free", [True, False])
def test_no_tokens_by_vocab_tensor_in_a_dpo_step(padding_free, tiny_model_dir, tiny_tokenizer, tmp_path):
    words = " ".join(f"w{i % 97}" for i in range(3000))
    ids = tiny_tokenizer(words)["input_ids"]
    text = lambda n, start=0: tiny_tokenizer.decode(ids[start:start + n])  # noqa: E731
    rows = [{"prompt": text(200), "chosen": text(900, 300), "rejected": text(780, 1300)}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(DPOConfig, tiny_model_dir, data, tmp_path / "run", max_steps=1, max_length=LENGTH,
                         per_device_train_batch_size=1, padding_free=padding_free, gradient_checkpointing=False)
    with LargestAllocation() as counter:
        train_dpo(config)
    vocab = len(tiny_tokenizer)
    assert "embedding_dense_backward" in counter.ops  # the step's backward ran under the counter
    assert counter.elements < _limit(vocab), f"a (tokens x vocab)-sized tensor: {counter.where}"


def test_no_tokens_by_vocab_tensor_in_grpo_log_probs(tiny_model_dir):
    # GRPO's loss pass: per-token log-probs and entropies of sampled completions under temperature, then backward
    from alignlab.models import load_causal_lm
    from alignlab.ops.logprobs import completion_logps

    model = load_causal_lm(tiny_model_dir)
    rows, prompt = 2, 64
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt + LENGTH))
    attention = torch.ones_like(ids)
    attention[1, -100:] = 0  # one completion stopped early
    completion = attention.clone()
    completion[:, :prompt] = 0
    with LargestAllocation() as counter:
        per_token, _, stats = completion_logps(model, ids, attention, completion, padding_free=True,
                                               temperature=0.7, token_stats=("entropy",))
        per_token.sum().backward()
    assert stats["entropy"].shape == per_token.shape and "embedding_dense_backward" in counter.ops
    assert counter.elements < _limit(model.config.vocab_size), f"a (tokens x vocab)-sized tensor: {counter.where}"
