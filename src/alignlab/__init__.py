"""alignlab: align causal language models with human preferences (SFT, reward models, PPO, GRPO, DPO)."""

__version__ = "0.1.0"

from alignlab.errors import DataError, UserError  # noqa: E402

__all__ = ["DataError", "UserError", "__version__"]
