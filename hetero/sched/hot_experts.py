"""Hot experts on the GPU from live traffic. The placement's profile decides which experts of a
layer start on the GPU (`gpu_experts: {hottest: N}`); HotExperts moves that set toward the
experts the router picks now.

Each MoE layer counts its routes as they pass (HybridExperts.submit: an index_add_ on the ids'
device, no host sync). Between two steps the caller's step loop calls `step_done()`; every
`every` steps the counts come back (one host sync for all layers), fold into scores that decay
by `decay` a swap point, and each layer exchanges up to `max_swaps` experts: its hottest CPU
expert takes the slot of its coldest GPU expert, if its score beats that one's by more than
`min_gain` (hysteresis: experts of near-equal scores do not ping-pong).

A swap copies packed bytes, so it applies where the GPU keeps the CPU's own format (placement
`gpu_format: int4-gG` with `format` the same): PackedGPUExperts and the engine's PackedExperts
hold identical rows, so an expert computes the same numbers wherever it runs. The incoming
expert's rows go from the engine's arrays into the outgoing expert's GPU slot; the outgoing
expert's rows (from the GPU's host copy, no device->host copy) go into the engine row the
incoming one left, unless the engine holds every expert already (a `hetero convert` store: row
e = expert e, never written). Then the layer's `rows` change, so the engine computes the
outgoing expert and skips the incoming one from the next step on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hetero.model import Transformer
from hetero.sched.hybrid import HybridExperts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HotConfig:
    every: int = 4  # steps between swap points (each reads the counts back: one host sync)
    max_swaps: int = 1  # experts a layer exchanges at a swap point (0: the static set)
    decay: float = 0.5  # the older scores' weight at a swap point: 0 the last window only, 1 all
    min_gain: float = 0.25  # an expert comes in if its score beats the outgoing one's by this

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_swaps < 0:
            raise ValueError(f"HotConfig: every >= 1 and max_swaps >= 0, got {self}")
        if not 0.0 <= self.decay <= 1.0 or self.min_gain < 0:
            raise ValueError(f"HotConfig: decay in [0, 1] and min_gain >= 0, got {self}")


class Swap(NamedTuple):
    layer: int
    incoming: int  # now on the GPU
    outgoing: int  # now on the CPU


def plan_swaps(
    scores: np.ndarray, resident: np.ndarray, max_swaps: int, min_gain: float
) -> list[tuple[int, int]]:
    """(incoming, outgoing) pairs: the hottest non-resident experts against the coldest
    resident ones, in turn, while the incoming score beats (1 + min_gain) x the outgoing one.
    scores [E], resident [E] bool; ties go to the lower id."""
    out_ = sorted(np.flatnonzero(resident).tolist(), key=lambda e: (scores[e], e))
    in_ = sorted(np.flatnonzero(~resident).tolist(), key=lambda e: (-scores[e], e))
    pairs = []
    for e_in, e_out in zip(in_, out_):  # in_ falls and out_ rises: the first miss ends it
        if len(pairs) == max_swaps or not scores[e_in] > (1 + min_gain) * scores[e_out]:
            break
        pairs.append((e_in, e_out))
    return pairs


def hit_rate(counts_on_gpu: float, total: float) -> float:
    """The share of routed (token, slot) pairs whose expert was on the GPU."""
    return counts_on_gpu / total if total else 0.0


class LiveSet:
    """One layer's policy on the host: the resident set, the decayed scores, the routes since
    the last swap point, and the hits (routes that found their expert resident)."""

    def __init__(self, resident: Collection[int], num_experts: int, config: HotConfig) -> None:
        self.config = config
        self.resident = np.zeros(num_experts, dtype=bool)  # [E]
        self.resident[list(resident)] = True
        self.scores = np.zeros(num_experts)  # [E]
        self.pending = np.zeros(num_experts)  # [E] routes not yet folded into the scores
        self.hits = self.routes = self.swaps = 0

    def add(self, counts: np.ndarray) -> None:
        """Routes [E] that ran with `resident` as it is."""
        self.hits += int(counts[self.resident].sum())
        self.routes += int(counts.sum())
        self.pending += counts

    def swap_point(self) -> list[tuple[int, int]]:
        c = self.config
        self.scores = c.decay * self.scores + self.pending
        self.pending[:] = 0
        pairs = plan_swaps(self.scores, self.resident, c.max_swaps, c.min_gain)
        for e_in, e_out in pairs:
            self.resident[e_in], self.resident[e_out] = True, False
        self.swaps += len(pairs)
        return pairs

    @property
    def hit_rate(self) -> float:
        return hit_rate(self.hits, self.routes)


def summarize(live: Mapping[int, LiveSet]) -> dict:
    """{"hit_rate": over all layers, "layers": {L: hit rate}, "routes", "swaps"}."""
    hits, routes = sum(s.hits for s in live.values()), sum(s.routes for s in live.values())
    return {
        "hit_rate": hit_rate(hits, routes),
        "layers": {L: s.hit_rate for L, s in live.items()},
        "routes": routes,
        "swaps": sum(s.swaps for s in live.values()),
    }


def replay(
    steps: Iterable[Mapping[int, np.ndarray]],
    resident: Mapping[int, Collection[int]],
    num_experts: int,
    config: HotConfig,
) -> dict[int, LiveSet]:
    """The policy over recorded routing, as HotExperts runs it on a model: `steps` each
    {layer: ids [T, k]}, `resident` each layer's GPU experts at the start. With
    HotConfig(max_swaps=0) the set never moves: the static placement's hit rate."""
    live = {L: LiveSet(r, num_experts, config) for L, r in resident.items()}
    for n, step in enumerate(steps, 1):
        for L, ids in step.items():
            if L in live:
                flat = np.asarray(ids).reshape(-1)
                live[L].add(np.bincount(flat[flat >= 0], minlength=num_experts))
        if n % config.every == 0:
            for s in live.values():
                s.swap_point()
    return live


def unswappable(routed: object) -> str | None:
    """Why a layer's routed backend cannot swap experts, or None if it can."""
    if not isinstance(routed, HybridExperts):
        return f"no CPU experts to swap with ({type(routed).__name__})"
    gpu, cpu = routed.gpu, routed.engine.layers[routed.layer]
    if gpu is None or len(routed.experts):
        return "its GPU experts are modules: swaps need packed ones (gpu_format int4-gG)"
    if not gpu.experts:
        return "no GPU experts"
    if cpu.fmt != gpu.packed.fmt:
        return (
            f"the CPU holds {cpu.fmt}, the GPU {gpu.packed.fmt}: a swap copies packed rows, so "
            f"the layer's format must be {gpu.packed.fmt} too"
        )
    for name, a in cpu.arrays().items():
        b = gpu.packed.arrays()[name]
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            return f"{name}: the CPU's rows are {a.dtype}{a.shape[1:]}, the GPU's {b.dtype}"
    writable = all(a.flags.writeable for a in cpu.arrays().values())
    if not _holds_all(routed) and not writable:
        return "the engine's arrays are read-only and lack the GPU's experts"
    return None


def _holds_all(routed: HybridExperts) -> bool:
    """Whether the engine holds every expert of the layer at row e = expert e (a store)."""
    rows, E = routed.rows_np, len(routed.rows_np)
    cpu = rows >= 0
    n = routed.engine.layers[routed.layer].num_experts
    return n == E and bool((rows[cpu] == np.flatnonzero(cpu)).all())


class HotLayer:
    """One layer's live set and the mechanics of its swaps. `home` [E]: the engine row that
    holds each expert's bytes, -1 none (the expert lives on the GPU only)."""

    def __init__(self, routed: HybridExperts, config: HotConfig) -> None:
        if routed.counts is not None:
            raise ValueError(f"layer {routed.layer} is counted already (another HotExperts)")
        self.routed = routed
        E = len(routed.rows_np)
        self.rows = routed.rows_np.copy()  # [E] what `reassign` will get
        self.home = np.arange(E) if _holds_all(routed) else self.rows.copy()
        self.live = LiveSet(routed.gpu.experts, E, config)
        routed.counts = torch.zeros(E, dtype=torch.int64, device=routed.gpu.local.device)

    def swap(self, e_in: int, e_out: int) -> None:
        gpu = self.routed.gpu
        cpu = self.routed.engine.layers[self.routed.layer].arrays()
        slot, r = gpu.experts.index(e_out), int(self.home[e_in])
        outgoing = None
        if self.home[e_out] < 0:  # the engine lacks it: it takes e_in's row
            outgoing = [a[slot].copy() for a in gpu.packed.arrays().values()]
        # (replace has read row r when it returns: pinned first on CUDA, a plain copy on CPU)
        gpu.replace(slot, e_in, [a[r] for a in cpu.values()])
        if outgoing is not None:
            for a, b in zip(cpu.values(), outgoing):
                a[r] = b
            self.home[e_out], self.home[e_in] = r, -1
        self.rows[e_in], self.rows[e_out] = -1, self.home[e_out]


class HotExperts:
    """The live policy over a model's MoE layers (all that can swap, or `layers`, each of which
    must). The caller's step loop calls `step_done()` after each step, when no expert job is in
    flight; it returns the swaps made (at most `max_swaps` a layer)."""

    def __init__(
        self,
        model: Transformer,
        config: HotConfig | None = None,
        layers: Iterable[int] | None = None,
    ) -> None:
        self.config = config or HotConfig()
        self.steps = 0
        moe = model.config.moe_layers
        chosen = moe if layers is None else tuple(layers)
        self.layers: dict[int, HotLayer] = {}
        why = {}
        for L in chosen:
            if L not in moe:
                raise ValueError(f"layer {L} is not a MoE layer ({moe[0]}-{moe[-1]})")
            routed = model.model.layers[L].mlp.routed
            why[L] = unswappable(routed)
            if why[L] is None:
                self.layers[L] = HotLayer(routed, self.config)
            elif layers is not None:
                raise ValueError(f"layer {L} cannot swap experts: {why[L]}")
            else:
                log.info("hot experts: layer %d keeps its GPU experts: %s", L, why[L])
        if not self.layers:
            reason = next((f" (layer {L}: {w})" for L, w in why.items()), "")
            raise ValueError(f"no layer can swap experts{reason}")

    def step_done(self) -> tuple[Swap, ...]:
        self.steps += 1
        if self.steps % self.config.every:
            return ()
        self.collect()
        swaps = []
        for L, h in self.layers.items():
            pairs = h.live.swap_point()
            for e_in, e_out in pairs:
                h.swap(e_in, e_out)
                swaps.append(Swap(L, e_in, e_out))
            if pairs:
                h.routed.reassign(h.rows)
        if swaps:
            log.debug("hot experts: %s", swaps)
        return tuple(swaps)

    def collect(self) -> None:
        """The routes counted since the last call, into each layer's LiveSet (one host sync)."""
        counts = torch.stack([h.routed.counts for h in self.layers.values()])  # [L', E]
        for h in self.layers.values():
            h.routed.counts.zero_()
        for h, c in zip(self.layers.values(), counts.cpu().numpy()):
            h.live.add(c)

    def summary(self) -> dict:
        """Hit rates so far (summarize), over the steps run."""
        self.collect()
        return summarize({L: h.live for L, h in self.layers.items()})

    def close(self) -> None:
        """Stops counting (the swaps made stay)."""
        for h in self.layers.values():
            h.routed.counts = None
