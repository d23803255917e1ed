"""alignlab: align causal language models with human preferences (SFT, reward models, PPO, GRPO, DPO).

Every training method's trainer and config can be imported from here, as from ``trl``::

    from alignlab import DPOConfig, DPOTrainer

They are imported on first use (module ``__getattr__``), so ``import alignlab`` stays light.
"""

__version__ = "0.1.0"

from alignlab.errors import DataError, UserError  # noqa: E402

_EXPORTS = {
    "alignlab.algorithms.sft": ("SFTTrainer", "SFTConfig"),
    "alignlab.algorithms.reward": ("RewardTrainer", "RewardConfig"),
    "alignlab.algorithms.dpo": ("DPOTrainer", "DPOConfig"),
    "alignlab.algorithms.kto": ("KTOTrainer", "KTOConfig"),
    "alignlab.algorithms.grpo": ("GRPOTrainer", "GRPOConfig"),
    "alignlab.algorithms.rloo": ("RLOOTrainer", "RLOOConfig"),
    "alignlab.algorithms.ppo": ("PPOTrainer", "PPOConfig"),
    "alignlab.algorithms.online_dpo": ("OnlineDPOTrainer", "OnlineDPOConfig"),
    "alignlab.algorithms.reinforce_pp": ("ReinforcePPTrainer", "ReinforcePPConfig"),
    "alignlab.algorithms.remax": ("ReMaxTrainer", "ReMaxConfig"),
    "alignlab.algorithms.iterative_dpo": ("IterativeDPO", "IterativeDPOConfig"),
}
"""Module -> the trainer and config it defines, one entry per registered method (``tests/test_trl_api.py``
checks that the registry has no method missing here)."""

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    """Import a trainer or config class on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'alignlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = ["DataError", "UserError", "__version__", *_WHERE]
