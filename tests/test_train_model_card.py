"""write_model_card: README.md beside the model, Hub front matter that parses back, the run's facts in the body."""

import os

import pytest
from huggingface_hub import ModelCard

from alignlab import __version__
from alignlab.train.model_card import write_model_card

COMMAND = "alignlab dpo --model_name_or_path HuggingFaceTB/SmolLM2-135M --dataset_name data/pairs.jsonl --beta 0.1"


def _write(out, **overrides):
    kwargs = dict(
        base_model="HuggingFaceTB/SmolLM2-135M",
        method="dpo",
        datasets=["trl-lib/ultrafeedback_binarized", "data/pairs.jsonl"],
        hyperparameters={"beta": 0.1, "learning_rate": 5e-7, "loss_type": "sigmoid", "max_steps": 200},
        final_metrics={"loss": 0.4123456789, "rewards/margins": 1.25, "rewards/accuracies": 0.875},
        command_line=COMMAND,
        peft=False,
    )
    kwargs.update(overrides)
    return write_model_card(out, **kwargs)


def test_the_card_is_written_and_parses_back(tmp_path):
    path = _write(tmp_path / "model")
    assert path == tmp_path / "model" / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]  # the local file is named in the body only
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["alignlab", "trl", "dpo"]
    text = card.text
    assert "trained with **dpo**" in text and "`HuggingFaceTB/SmolLM2-135M`" in text
    assert "- `data/pairs.jsonl`" in text and "- `trl-lib/ultrafeedback_binarized`" in text
    assert "| `beta` | 0.1 |" in text and "| `learning_rate` | 5e-07 |" in text and "| `max_steps` | 200 |" in text
    assert "| `loss` | 0.412346 |" in text and "| `rewards/accuracies` | 0.875 |" in text
    assert f"```bash\n{COMMAND}\n```" in text
    assert f"alignlab {__version__}" in text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder")' in text
    assert [p.name for p in path.parent.iterdir()] == ["README.md"]  # no temporary file left behind


def test_adapter_reward_model_local_base_and_awkward_text(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    command = "alignlab reward --model_name_or_path " + str(base) + " --run_name 'a | b ```'"
    path = _write(tmp_path / "rm", base_model=str(base), method="reward", peft=True, command_line=command,
                  final_metrics={}, hyperparameters={"note": "x | y"})
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local path is not a Hub id
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert "lora" in card.data.tags and "reward" in card.data.tags
    text = card.text
    assert f"`{base}`" in text and "LoRA adapter (PEFT)" in text
    assert f"````bash\n{command}\n````" in text  # the fence outgrows the backticks inside the command
    assert "| `note` | x \\| y |" in text and "No metrics were logged." in text
    assert "AutoPeftModelForSequenceClassification" in text


def test_rewriting_replaces_the_card_atomically(tmp_path, monkeypatch):
    path = _write(tmp_path)
    before = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, method="grpo")
    assert path.read_text() == before  # the old card is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # the temporary file was removed
    monkeypatch.undo()
    _write(tmp_path, method="grpo")
    assert "trained with **grpo**" in path.read_text()
