"""Where a prefill chunk's routed CPU experts run, a layer at a time, decided from measured rates:
on the CPU engine, streamed to the GPU, or split across experts (the CPU takes the experts with
the fewest tokens, the GPU the rest, both at once).

Pure functions of `Rates` (sched/rates.py) and numbers, no torch and no CUDA: hybrid.py calls
`split` once per layer per chunk with that chunk's tokens per expert; hetero/predict.py calls it
on the expected counts. The cost model (docs/predict.md):
- CPU: the engine's measured cost, one call over its experts (`ExpertCost.call`);
- GPU: the used experts' packed bytes are gathered into pinned slots by the engine's threads,
  cross PCIe and are computed from those bytes, the three overlapped group by group
  (sched/streaming.py), plus a fixed latency: latency + max(bytes / staging gather,
  bytes / H2D, GPU compute), and the pipeline's start: the first slot's group passes each
  stage before the next overlaps (`_pipeline`);
- split: both sides at once, so the chunk takes the slower side; the gather runs on the CPU
  engine's worker, so it (and the latency of handing its slots over) is charged to the CPU
  side too.
Why the CPU takes the experts with few tokens: an expert costs the GPU its bytes whatever its
token count (the transfer dominates), the CPU a time that grows with its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from hetero.sched.rates import Rates

# Streaming any experts at all: the staging buffer's event wait, the copies' and kernels'
# launches, one synchronization. An estimate: the H100 runs (64-2048 tokens) do not separate it
# from the bytes (bench/results/2026-11-23-h100x1-prefill_stream_pinned.jsonl).
STREAM_LATENCY_S = 0.5e-3
MODES = ("cpu", "gpu", "split")


class Split(NamedTuple):
    mode: str  # "cpu" | "gpu" | "split"
    on_cpu: np.ndarray  # [E] bool: the experts the CPU computes (those without tokens too)
    seconds: float  # predicted for the layer's routed CPU experts: the slower side
    cpu_s: float  # the CPU engine: its experts, and gathering the GPU's where staged
    gpu_s: float  # the GPU: its experts' bytes over PCIe, overlapped with computing them


def cpu_time(rates: Rates, fmt: str, tokens_per_expert: Sequence[float] | np.ndarray) -> float:
    """Seconds of the CPU engine on experts with these token counts (zeros: unused)."""
    return rates.cpu_cost(fmt).call(tokens_per_expert)


def gpu_stream_time(
    rates: Rates,
    fmt: str,
    tokens_per_expert: Sequence[float] | np.ndarray,
    expert_bytes: int,
    staged: bool = True,
    slot_bytes: int = 0,
) -> float:
    """Seconds to stream the experts with tokens to the GPU and compute them there (inf where
    there is no GPU, or no GPU measurement of `fmt`). `slot_bytes`: the staging slot, whose
    first group fills the pipeline (0: a pipeline without a start)."""
    n = np.asarray(tokens_per_expert, dtype=np.float64)
    used = n[n > 0]
    if used.size == 0:
        return 0.0
    cost = rates.gpu_cost(fmt)
    if not rates.has_gpu or cost is None:
        return math.inf
    nbytes = used.size * expert_bytes
    stages = [nbytes / (rates.h2d_gbps * 1e9), cost.call(used), _stage_s(rates, nbytes, staged)]
    return float(_pipeline(np.array(stages), nbytes, slot_bytes))


def split(
    rates: Rates,
    fmt: str,
    counts: Sequence[float] | np.ndarray,
    expert_bytes: int,
    staged: bool = True,
    slot_bytes: int = 0,
) -> Split:
    """One layer's CPU experts for one chunk: counts [E] tokens per expert (zeros: unused) ->
    the fastest of every split point (the CPU takes the j experts with the fewest tokens, the
    GPU streams the rest; j = all: "cpu", j = 0: "gpu"). Ties go to the CPU (less PCIe).
    `staged`, `slot_bytes`: as the streaming runs (gpu_stream_time)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError(f"counts must be [E] token counts >= 0, got shape {counts.shape}")
    on_cpu = np.ones(counts.shape[0], dtype=bool)
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]  # the used experts, fewest tokens first
    n, A = counts[order], order.shape[0]
    if A == 0:
        return Split("cpu", on_cpu, 0.0, 0.0, 0.0)
    cpu = rates.cpu_cost(fmt)
    cpu_s = np.concatenate([[0.0], cpu.call_s + np.cumsum(cpu.expert_s(n))])  # [A + 1]: j on CPU
    gcost = rates.gpu_cost(fmt)
    if not rates.has_gpu or gcost is None:
        return Split("cpu", on_cpu, float(cpu_s[A]), float(cpu_s[A]), 0.0)
    on_gpu = A - np.arange(A + 1)  # [A + 1] experts streamed
    nbytes = on_gpu * float(expert_bytes)
    each = gcost.expert_s(n)
    compute = gcost.call_s + (each.sum() - np.concatenate([[0.0], np.cumsum(each)]))
    stage = _stage_s(rates, nbytes, staged)
    stages = np.stack([nbytes / (rates.h2d_gbps * 1e9), compute, stage])  # [3, A + 1]
    gpu_s = np.where(on_gpu > 0, _pipeline(stages, nbytes, slot_bytes), 0.0)
    if staged and rates.stage_gbps > 0:  # the engine's worker gathers the GPU's experts
        cpu_s = cpu_s + stage + np.where(on_gpu > 0, STREAM_LATENCY_S, 0.0)
    total = np.maximum(cpu_s, gpu_s)
    j = int(np.flatnonzero(total <= total.min() * (1 + 1e-12))[-1])  # the most on the CPU
    on_cpu[order[j:]] = False
    mode = "cpu" if j == A else "gpu" if j == 0 else "split"
    return Split(mode, on_cpu, float(total[j]), float(cpu_s[j]), float(gpu_s[j]))


def _pipeline(stages: np.ndarray, nbytes, slot_bytes: int):
    """Seconds of the gather -> copy -> compute pipeline over G groups of a slot each, from
    each stage's seconds for all of it ([3, ...]): the first group passes every stage, the
    other G - 1 go at the slowest stage's pace, so latency + max + (sum - max) / G."""
    slowest = stages.max(axis=0)
    groups = np.maximum(1, np.ceil(nbytes / slot_bytes)) if slot_bytes else np.inf
    return STREAM_LATENCY_S + slowest + (stages.sum(axis=0) - slowest) / groups


def _stage_s(rates: Rates, nbytes, staged: bool):
    """Seconds of gathering `nbytes` into the pinned staging slots (0 where not staged)."""
    if not staged or rates.stage_gbps <= 0:
        return 0.0 * nbytes
    return nbytes / (rates.stage_gbps * 1e9)
