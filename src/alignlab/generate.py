"""``alignlab generate``: sample completions from a base or trained model (transformers' ``generate``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlab.errors import UserError
from alignlab.models import default_device, load_causal_lm, load_tokenizer


@dataclass
class GenerateConfig:
    """Settings of ``alignlab generate``."""

    prompt: list[str] | None = None
    """One or more prompts (repeat the flag or give several strings)."""
    model_name_or_path: str | None = None
    """Hugging Face id, local directory (a trained output_dir works, adapters included), or unset for the
    embedded SmolLM2-135M-Instruct."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens per completion."""
    do_sample: bool = True
    """Sample (true) or decode greedily (false)."""
    temperature: float = 0.7
    top_p: float = 1.0
    num_return_sequences: int = 1
    """Completions per prompt."""
    use_chat_template: bool = True
    """Wrap each prompt as a user message with the tokenizer's chat template, when it has one."""
    seed: int = 42
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.prompt:
            raise UserError("--prompt is required")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_return_sequences < 1:
            raise UserError(f"--num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.do_sample and not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")


def generate(config: GenerateConfig) -> list[list[str]]:
    """Completions for each prompt: ``result[i][j]`` is the j-th completion of prompt i (special tokens
    stripped). The chat template is applied when the tokenizer has one and ``use_chat_template`` is set."""
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    device = default_device()
    model = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code).to(device).eval()
    torch.manual_seed(config.seed)
    results = []
    for prompt in config.prompt:
        if config.use_chat_template and tokenizer.chat_template:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        kwargs = {"do_sample": config.do_sample, "max_new_tokens": config.max_new_tokens}
        if config.do_sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
        with torch.no_grad():
            out = model.generate(
                **enc,
                num_return_sequences=config.num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
        start = enc["input_ids"].shape[1]
        results.append([tokenizer.decode(seq[start:], skip_special_tokens=True).strip() for seq in out])
    return results
