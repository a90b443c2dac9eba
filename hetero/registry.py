"""One small registry per backend seam: a frozen map from a backend's name to `module:attr`.

Factories are imported only when chosen, so a CPU-only install never imports Triton; a bad name
gets an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


class Registry:
    def __init__(self, seam: str, backends: Mapping[str, str]) -> None:
        self.seam = seam
        self.backends = MappingProxyType(dict(backends))

    def get(self, name: str) -> Any:
        if name not in self.backends:
            valid = ", ".join(sorted(self.backends))
            raise ValueError(f"unknown {self.seam} backend {name!r} (valid: {valid})")
        module, _, attr = self.backends[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def __contains__(self, name: str) -> bool:
        return name in self.backends


MLA_ATTENTION = Registry(
    "mla_attention",
    {
        "naive": "hetero.model.attention:naive_attention",
        "absorbed": "hetero.model.attention:absorbed_attention",
        "triton": "hetero.model.attention:paged_attention",
        "flashinfer": "hetero.model.attention:flashinfer_attention",
        "auto": "hetero.model.attention:flashinfer_attention",  # (MLA resolves it at load)
    },
)
ROUTED_EXPERTS = Registry(
    "routed_experts",
    {"torch": "hetero.model.moe:TorchExperts", "hybrid": "hetero.sched.hybrid:HybridExperts"},
)
