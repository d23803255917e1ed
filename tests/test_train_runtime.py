"""The runtime (train/runtime.py): what it gives algorithms, that the loop's one optimizer-step path runs its CPU
hooks, and that algorithm modules reach precision, sharding and the speed layer through it only."""

import ast
from pathlib import Path

import torch

from alignlab.algorithms.dpo import DPOConfig, train_dpo
from alignlab.models import default_device
from alignlab.train.runtime import Runtime, disable_dropout
from tests.conftest import tiny_config

ALGORITHMS = Path(__file__).resolve().parents[1] / "src" / "alignlab" / "algorithms"


def test_the_loop_step_runs_the_after_backward_hook(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    # the trim after the last backward of an update and the one after its optimizer step, once per step each and
    # in that order: fails if the loop's step path skips the runtime's after-backward hook
    from alignlab.ops import cpu_kernels

    events = []
    monkeypatch.setattr(cpu_kernels, "after_backward", lambda device: events.append(("after_backward", device.type)))
    monkeypatch.setattr(cpu_kernels, "after_optimizer_step",
                        lambda device: events.append(("after_optimizer_step", device.type)))
    train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2))
    assert events == [("after_backward", "cpu"), ("after_optimizer_step", "cpu")] * 2


def test_precision_is_bf16_autocast_on_the_runtime_device_when_asked(tmp_path):
    on = Runtime(DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), bf16=True))
    off = Runtime(DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), bf16=False))
    assert on.device == off.device == default_device() and on.accelerator is None and on.is_main_process
    x = torch.ones(2, 2, device=on.device)
    with on.precision():
        assert (x @ x).dtype == torch.bfloat16
    with off.precision():
        assert (x @ x).dtype == torch.float32
    assert on.gather(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]  # one process: itself


def test_prepare_and_freeze_models(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, attention_dropout=0.1)
    runtime = Runtime(DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), bf16=False))
    model = runtime.prepare_model(LlamaForCausalLM(tiny))
    assert model.config.use_cache is False
    assert all(p.requires_grad for p in model.parameters()) and not runtime.is_sharded(model)
    frozen = runtime.frozen_model(LlamaForCausalLM(tiny).train())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with runtime.sampling(model) as sampled:  # unsharded: the model itself
        assert sampled is model
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3))
    disable_dropout(layers)
    assert layers[1].p == 0.0


# Every algorithm module reaches precision, sharding and the CPU speed layer through the runtime.
INTERNALS = {"alignlab.ops.cpu_kernels", "alignlab.ops.memory", "alignlab.train.distributed"}


def test_algorithm_modules_use_the_runtime_only():
    checked = []
    for path in sorted(ALGORITHMS.glob("*.py")):
        if path.name == "__init__.py":
            continue
        checked.append(path.name)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                assert not names & INTERNALS, f"{path.name}:{node.lineno} imports {sorted(names & INTERNALS)}"
                assert not (node.module == "alignlab.train.loop" and {"autocast", "build_accelerator"} &
                            {a.name for a in node.names}), f"{path.name}:{node.lineno} imports the loop's autocast"
                assert node.module != "alignlab.train.setup" or {a.name for a in node.names} <= {
                    "load_train_eval", "split_rows"}, f"{path.name}:{node.lineno} readies models outside the runtime"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & INTERNALS, f"{path.name}:{node.lineno}"
            if isinstance(node, ast.Attribute) and node.attr == "autocast":
                raise AssertionError(f"{path.name}:{node.lineno} uses torch.autocast directly")
    assert {"base.py", "online.py", "grpo.py", "rloo.py", "reinforce_pp.py", "ppo.py", "remax.py", "dpo.py", "kto.py",
            "sft.py", "reward.py", "iterative_dpo.py", "online_dpo.py"} <= set(checked)
