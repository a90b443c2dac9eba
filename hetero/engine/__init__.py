"""The request level: continuous batching over a paged latent KV cache (see docs/engine.md)."""

from hetero.engine.engine import Engine, RequestError, ServingConfig
from hetero.engine.grammar import GrammarSpec
from hetero.engine.handle import EngineHandle, EngineStats
from hetero.engine.outputs import RequestOutput, TokenLogprob
from hetero.engine.params import SamplingParams

__all__ = [
    "Engine",
    "EngineHandle",
    "EngineStats",
    "GrammarSpec",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "ServingConfig",
    "TokenLogprob",
]
