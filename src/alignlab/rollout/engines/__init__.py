"""Generation engines: how completions are sampled from the policy (``--generation_backend``).

* ``generate``: transformers ``generate``, dynamic KV cache (:class:`~.hf_generate.GenerateEngine`);
* ``static``: ``generate`` with a static KV cache and the decode step compiled (:class:`~.hf_generate.StaticEngine`);
* ``paged``: transformers' continuous batching over a paged KV cache (:class:`~.paged.PagedEngine`);
* ``auto``: the fastest measured for the device type (:data:`AUTO`, from ``benchmarks/generation.py``).

Every engine returns the sampled tokens' log-probs. docs/rollouts.md has the choice of names and the numbers.
"""

from __future__ import annotations

import torch

from alignlab.rollout.engines.base import Completions, GenerationEngine, SamplingParams
from alignlab.rollout.engines.hf_generate import GenerateEngine, InverseCDFSampling, StaticEngine
from alignlab.rollout.engines.paged import PagedEngine

__all__ = ["AUTO", "BACKENDS", "Completions", "GenerateEngine", "GenerationEngine", "InverseCDFSampling",
           "PagedEngine", "SamplingParams", "StaticEngine", "build_engine", "engine_for", "resolve_backend"]

ENGINES: dict[str, type[GenerationEngine]] = {"generate": GenerateEngine, "static": StaticEngine, "paged": PagedEngine}
BACKENDS = ("auto", *ENGINES)
"""Values of ``--generation_backend``."""

AUTO: dict[str, str] = {"cpu": "generate", "cuda": "generate"}
"""What ``auto`` runs per device type. CPU: ``generate`` stays fastest at 16 and 64 rows x 128 tokens on the
embedded model (benchmarks/README.md, decoding). CUDA: not measured yet, so the current path."""


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The engine name ``backend`` stands for on ``device`` (``auto`` resolved through :data:`AUTO`, ``generate``
    for device types not in it).

    Raises:
        ValueError: ``backend`` not in :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"generation_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return AUTO.get(torch.device(device).type, "generate")
    return backend


def build_engine(backend: str, model: torch.nn.Module, **kwargs) -> GenerationEngine:
    """A new engine named ``backend`` (``auto`` resolved for the model's device) decoding with ``model``;
    ``kwargs`` go to the engine's constructor.

    Raises:
        ValueError: an unknown ``backend``.
    """
    name = resolve_backend(backend, next(model.parameters()).device)
    return ENGINES[name](model, **kwargs)


def engine_for(model: torch.nn.Module, backend: str = "auto") -> GenerationEngine:
    """The engine that samples from ``model`` with ``backend``, kept for the model's lifetime (one per model and
    backend, so a compiled or served engine is built once per run), its :meth:`~GenerationEngine.update_weights`
    called with ``model`` first: call it before each rollout.

    Raises:
        ValueError: an unknown ``backend``.
    """
    name = resolve_backend(backend, next(model.parameters()).device)
    per_model = model.__dict__.setdefault("_alignlab_generation_engines", {})  # dies with the model
    if name not in per_model:
        per_model[name] = ENGINES[name](model)
    engine = per_model[name]
    engine.update_weights(model)
    return engine
