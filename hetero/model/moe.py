"""The MoE block: routing lives in the model, the routed experts sit behind a seam."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import ModelConfig
from hetero.model.layers import MLP
from hetero.registry import ROUTED_EXPERTS


class Gate(nn.Module):
    """Router: scores every expert, picks k per token.

    V2 scores by softmax and picks greedily (optionally within the best groups by their max).
    V3 (`noaux_tc`) scores by sigmoid and picks by score + e_score_correction_bias, first the
    `topk_group` best of `n_group` groups (a group's worth: its two best biased scores), then the
    top k inside them; the bias only chooses, the weights are the unbiased scores.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.counters: torch.Tensor | None = None  # `route_counters`

    def route_counters(self, device: torch.device, tokens: int) -> torch.Tensor:
        """This gate's own per-token counters for hetero.gpu.router.gemv_route (int32 zeros,
        allocated on first use, which CUDA graphs' warm-up runs before capture)."""
        if self.counters is None or self.counters.device != device:
            self.counters = torch.zeros(tokens, dtype=torch.int32, device=device)
        return self.counters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, ids [T, k]). On CUDA one kernel up to 16 tokens,
        else the matmul and one kernel (hetero.gpu.router); `torch_route` is the reference."""
        if x.is_cuda:
            from hetero.gpu.router import route  # triton: imported where it runs

            return route(self, x)
        return self.torch_route(x)

    def torch_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        T, E, G = x.shape[0], c.n_routed_experts, c.n_group
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores
        if c.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        if G > 1 and c.topk_method != "greedy":
            grouped = choice.view(T, G, E // G)
            if c.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, E // G), dim=-1).values.sum(-1)  # [T, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(c.topk_group, dim=-1).indices  # [T, topk_group]
            mask = torch.ones(T, G, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
            fill = float("-inf") if c.topk_method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(mask[:, :, None], fill).view(T, E)
        ids = choice.topk(c.num_experts_per_tok, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids


class RoutedRun(NamedTuple):
    """A layer's routed experts in flight: `result()` is their sum for this layer; `deferred`,
    if any, is work handed to the next layer (see hetero.sched.hybrid)."""

    result: Callable[[], torch.Tensor]
    deferred: Pending | None = None


class Pending(Protocol):
    def result(self) -> torch.Tensor: ...


class TorchExperts:
    """The reference backend: every routed expert a module, run by the per-expert loop."""

    def __init__(self, experts: nn.ModuleDict) -> None:
        self.experts = experts

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> RoutedRun:
        y = torch_routed_experts(self.experts, x, ids, weights)
        return RoutedRun(lambda: y)


class MoE(nn.Module):
    """Routing here, routed experts behind `self.routed` (a backend with `submit`), shared experts
    on this module's device while the routed ones run."""

    def __init__(
        self, config: ModelConfig, backend: str = "torch", resident: Iterable[int] | None = None
    ) -> None:
        super().__init__()
        H, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = Gate(config)
        if resident is None:
            resident = range(config.n_routed_experts)
        # a dict keyed by expert id keeps the checkpoint's names (mlp.experts.{e}.*) for any subset
        self.experts = nn.ModuleDict({str(e): MLP(H, inter) for e in resident})
        self.shared_experts = (
            MLP(H, inter * config.n_shared_experts) if config.n_shared_experts else None
        )
        self.routed = ROUTED_EXPERTS.get(backend)(self.experts)

    def forward(
        self, x: torch.Tensor, pending: Pending | None = None
    ) -> tuple[torch.Tensor, Pending | None]:
        """x [T, H] -> (y [T, H], work deferred to the next layer). `pending`: the previous
        layer's deferred experts, added here."""
        weights, ids = self.gate(x)  # [T, k] each
        run = self.routed.submit(x, ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return finish(run, shared, pending)


def finish(
    run: RoutedRun,
    shared: torch.Tensor | None,
    pending: Pending | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Pending | None]:
    """A MoE layer's output once its routed experts are in flight: their sum + (the shared
    experts + the previous layer's deferred experts), in that order wherever it is computed;
    and the work this layer defers. The bracket is summed before waiting for the routed sum
    (the deferred part was done before this layer's CPU job began), so after the wait one add
    is left on a decode step's critical path. `out`: written there (a graph's static input)."""
    rest = shared
    if pending is not None:
        done = pending.result()
        rest = done if rest is None else rest + done
    y = run.result()
    if out is None:
        return (y if rest is None else y + rest), run.deferred
    if rest is None:
        return out.copy_(y), run.deferred
    return torch.add(y, rest, out=out), run.deferred


def torch_routed_experts(
    experts: nn.ModuleDict, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The reference: each expert over the tokens that chose it. x [T, H], ids/weights [T, k];
    ids < 0 are experts computed elsewhere."""
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows, slot = torch.nonzero(ids == e, as_tuple=True)  # [n], [n]
        out = experts[str(e)](x[rows]) * weights[rows, slot, None]
        y.index_add_(0, rows, out.to(y.dtype))
    return y
