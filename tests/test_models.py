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
