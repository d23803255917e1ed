"""Generation engines: how completions are sampled from the policy (``--generation_backend``).

* ``generate``: transformers ``generate``, dynamic KV cache (:class:`~.hf_generate.GenerateEngine`);
* ``static``: ``generate`` with a static KV cache and the decode step compiled (:class:`~.hf_generate.StaticEngine`);
* ``paged``: transformers' continuous batching over a paged KV cache (:class:`~.paged.PagedEngine`);
* ``auto``: the fastest measured for the device type (:data:`AUTO`, from ``benchmarks/generation.py``), resolved
  at each call (autocast to another dtype than the weights' rules ``paged`` out: :data:`AUTO_UNDER_AUTOCAST`).

Every engine returns the sampled tokens' log-probs. docs/rollouts.md has the choice of names and the numbers.
"""

from __future__ import annotations

import torch

from alignlab.rollout.engines.base import ENGINES, Completions, GenerationEngine, SamplingParams
from alignlab.rollout.engines.hf_generate import GenerateEngine, InverseCDFSampling, StaticEngine
from alignlab.rollout.engines.paged import PagedEngine

__all__ = ["AUTO", "AUTO_UNDER_AUTOCAST", "BACKENDS", "Completions", "ENGINES", "GenerateEngine", "GenerationEngine",
           "InverseCDFSampling", "PagedEngine", "SamplingParams", "StaticEngine", "build_engine", "engine_for", "resolve_backend"]

BACKENDS = ("auto", *ENGINES)
"""Values of ``--generation_backend``."""

AUTO: dict[str, str] = {"cpu": "generate", "cuda": "generate"}
"""What ``auto`` runs per device type, from ``benchmarks/generation.py`` (benchmarks/README.md, decoding). CPU:
``generate``, the fastest at 16 and 64 rows x 128 tokens in float32 and in bf16 autocast (2.0-3.9x ahead of
``static`` and ``paged``). CUDA: not measured yet, so the path alignlab had."""

AUTO_UNDER_AUTOCAST: dict[str, str] = {"cpu": "generate", "cuda": "generate"}
"""What ``auto`` runs when autocast to another dtype than the weights' is on (``paged`` refuses it); the CPU
entry is the fastest in bf16 autocast (``generate``, ahead of ``static``)."""


def _autocast_differs(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether autocast to a dtype other than ``dtype`` is on for ``device``'s type."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return False
    return dtype is None or torch.get_autocast_dtype(kind) != dtype


def resolve_backend(backend: str, device: torch.device | str, *, autocast_differs: bool = False) -> str:
    """The engine name ``backend`` stands for on ``device``: ``auto`` resolved through :data:`AUTO` (or
    :data:`AUTO_UNDER_AUTOCAST` when ``autocast_differs``: autocast to another dtype than the weights' is on),
    ``generate`` for device types in neither.

    Raises:
        ValueError: ``backend`` not in :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"generation_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        table = AUTO_UNDER_AUTOCAST if autocast_differs else AUTO
        return table.get(torch.device(device).type, "generate")
    return backend


def _resolve_for(backend: str, model: torch.nn.Module) -> str:
    weight = next(model.parameters())
    return resolve_backend(backend, weight.device, autocast_differs=_autocast_differs(weight.device, weight.dtype))


def build_engine(backend: str, model: torch.nn.Module, **kwargs) -> GenerationEngine:
    """A new engine named ``backend`` (``auto`` resolved for the model's device and the autocast state now)
    decoding with ``model``; ``kwargs`` go to the engine's constructor.

    Raises:
        ValueError: an unknown ``backend``.
    """
    return ENGINES.get(_resolve_for(backend, model))(model, **kwargs)


def engine_for(model: torch.nn.Module, backend: str = "auto") -> GenerationEngine:
    """The engine that samples from ``model`` with ``backend`` (``auto`` resolved for the model's device and the
    autocast state now), kept for the model's lifetime (one per model and
    backend, so a compiled or served engine is built once per run), its :meth:`~GenerationEngine.update_weights`
    called with ``model`` first: call it before each rollout.

    Raises:
        ValueError: an unknown ``backend``.
    """
    name = _resolve_for(backend, model)
    per_model = model.__dict__.setdefault("_alignlab_generation_engines", {})  # dies with the model
    if name not in per_model:
        per_model[name] = ENGINES.get(name)(model)
    engine = per_model[name]
    engine.update_weights(model)
    return engine
