"""Model loading: offline by default (no hub kernels unless asked)."""

import pytest

from alignlab import models


@pytest.mark.parametrize("loader", ["load_causal_lm", "load_reward_model"])
@pytest.mark.parametrize("asked", [False, True])
def test_hub_kernels_only_when_asked(tiny_model_dir, monkeypatch, loader, asked):
    # transformers 5 turns hub kernels on by default on CUDA and then downloads them: alignlab passes
    # use_kernels explicitly, False unless the user asks (--use_kernels)
    import transformers

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")  # the loader turns it into its one-line UserError

    cls = "AutoModelForCausalLM" if loader == "load_causal_lm" else "AutoModelForSequenceClassification"
    monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", fake_from_pretrained)
    kwargs = {} if loader == "load_causal_lm" else {"pad_token_id": 0}
    if asked:
        kwargs["use_kernels"] = True
    with pytest.raises(models.UserError, match="stop here"):
        getattr(models, loader)(tiny_model_dir, **kwargs)
    assert seen["use_kernels"] is asked and seen["use_safetensors"] is True


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS"])
def test_merged_lora_weights_from_a_gathered_state_dict_match_peft(tiny_model_dir, task_type):
    # Under FSDP2 the adapters are merged into the gathered full state dict (models._merged_lora_state_dict);
    # the result must be peft's merge_and_unload, adapters with non-zero B included, and for a reward model
    # (SEQ_CLS) the trained copy of the score head (modules_to_save).
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task_type == "SEQ_CLS":
        base, extra = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1), ["score"]
    else:
        base, extra = AutoModelForCausalLM.from_pretrained(tiny_model_dir), None
    model = models.apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=None, task_type=task_type,
                              modules_to_save=extra)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    merged = models._merged_lora_state_dict(model, model.state_dict())
    expected = model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
