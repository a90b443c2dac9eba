"""The prefill policy (hetero.sched.prefill_policy): every branch of `split`, the split point
against a brute force, and the cost tables it reads (hetero.sched.rates.ExpertCost)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hetero.sched.prefill_policy import (
    STREAM_LATENCY_S,
    cpu_time,
    gpu_stream_time,
    split,
)
from hetero.sched.rates import CalibrationError, ExpertCost, Rates

MS = 1e-3
EXPERT_BYTES = 25_000_000  # a V3 expert at int4-g32, about
# CPU: bandwidth-bound at few tokens, then ~33 us a token; GPU: ~2 us a token, bytes aside
CPU = ExpertCost((1, 4, 16, 64, 256), tuple(v * MS for v in (0.25, 0.42, 0.65, 2.1, 8.3)), 0.1 * MS)
GPU = ExpertCost((1, 64, 256), tuple(v * MS for v in (0.01, 0.025, 0.08)), 0.1 * MS)


def rates(h2d: float = 51.0, stage: float = 0.0, gpu: bool = True) -> Rates:
    return Rates(
        shape=(7168, 2048),
        host_read_gbps=115.0,
        stage_gbps=stage,
        h2d_gbps=h2d if gpu else 0.0,
        hbm_gbps=4000.0 if gpu else None,
        gpu_tflops=700.0 if gpu else None,
        cpu={"int4-g32": CPU},
        gpu={"int4-g32": GPU} if gpu else {},
    )


def test_no_gpu_is_cpu_whatever_the_tokens():
    counts = np.full(256, 512)
    s = split(rates(gpu=False), "int4-g32", counts, EXPERT_BYTES)
    assert s.mode == "cpu" and s.on_cpu.all() and s.gpu_s == 0
    assert s.seconds == pytest.approx(cpu_time(rates(gpu=False), "int4-g32", counts))
    assert gpu_stream_time(rates(gpu=False), "int4-g32", counts, EXPERT_BYTES) == math.inf
    # a GPU without a measurement of this format streams nothing either
    no_table = Rates((7168, 2048), 115.0, h2d_gbps=51.0, cpu={"int4-g32": CPU})
    assert split(no_table, "int4-g32", counts, EXPERT_BYTES).mode == "cpu"


def test_few_tokens_stay_on_the_cpu():
    counts = np.zeros(256)
    counts[:8] = 1  # a decode-sized chunk: 8 experts of one token
    r = rates(stage=30.0)  # the engine's threads would gather any streamed expert first
    s = split(r, "int4", counts, EXPERT_BYTES)  # ("int4" is int4-g32)
    assert s.mode == "cpu" and s.on_cpu.all()
    assert s.seconds == pytest.approx(CPU.call_s + 8 * CPU.expert_s(1))


def test_many_tokens_with_fast_h2d_stream_everything():
    counts = np.full(256, 64)  # 2048 tokens, top-8 of 256
    r = rates(h2d=51.0, stage=40.0)  # the engine's threads gather: the CPU has no time left
    s = split(r, "int4-g32", counts, EXPERT_BYTES)
    assert s.mode == "gpu" and not s.on_cpu.any()
    gather_s = 256 * EXPERT_BYTES / 40e9  # the pipeline's slowest stage
    assert s.seconds == pytest.approx(STREAM_LATENCY_S + gather_s)
    assert s.seconds < cpu_time(r, "int4-g32", counts) / 3


def test_mixed_counts_split_with_the_cpu_taking_the_fewest_tokens():
    rng = np.random.default_rng(0)
    counts = np.where(rng.random(256) < 0.5, 1, 200)
    rng.shuffle(counts)
    s = split(rates(h2d=25.0), "int4-g32", counts, EXPERT_BYTES)
    assert s.mode == "split"
    assert counts[s.on_cpu].max() <= counts[~s.on_cpu].min()
    assert s.on_cpu.sum() > 0 and (~s.on_cpu).sum() > 0
    assert s.seconds == pytest.approx(max(s.cpu_s, s.gpu_s))
    # both parts as the public cost functions see them
    assert s.cpu_s == pytest.approx(cpu_time(rates(h2d=25.0), "int4-g32", counts[s.on_cpu]))
    gpu_part = gpu_stream_time(rates(h2d=25.0), "int4-g32", counts[~s.on_cpu], EXPERT_BYTES)
    assert s.gpu_s == pytest.approx(gpu_part)


def brute_force(r: Rates, counts: np.ndarray, staged: bool, slot: int = 0) -> float:
    """The best max(CPU part, GPU part) over every sorted prefix for the CPU."""
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]
    best = math.inf
    for j in range(len(order) + 1):
        on_cpu, on_gpu = counts[order[:j]], counts[order[j:]]
        gpu = gpu_stream_time(r, "int4-g32", on_gpu, EXPERT_BYTES, staged, slot)
        cpu = cpu_time(r, "int4-g32", on_cpu)
        if staged and r.stage_gbps and len(on_gpu):  # the engine's worker gathers them
            cpu += len(on_gpu) * EXPERT_BYTES / (r.stage_gbps * 1e9) + STREAM_LATENCY_S
        best = min(best, max(cpu, gpu))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stage, slot", [(0.0, 0), (30.0, 0), (30.0, 20 * EXPERT_BYTES)])
def test_split_point_minimizes_the_slower_side(seed, stage, slot):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.uniform(0.5, 80), 64) * (rng.random(64) < 0.9)
    r = rates(h2d=rng.uniform(5, 60), stage=stage)
    s = split(r, "int4-g32", counts, EXPERT_BYTES, slot_bytes=slot)
    assert s.seconds == pytest.approx(brute_force(r, counts, True, slot))
    unstaged = split(r, "int4-g32", counts, EXPERT_BYTES, staged=False, slot_bytes=slot)
    assert unstaged.seconds == pytest.approx(brute_force(r, counts, False, slot))
    assert unstaged.seconds <= s.seconds + 1e-12


def test_the_pipeline_starts_with_one_group_through_every_stage():
    r, used = rates(h2d=50.0, stage=25.0), np.full(40, 64)
    gather, copy = 40 * EXPERT_BYTES / 25e9, 40 * EXPERT_BYTES / 50e9
    compute = GPU.call(used)
    overlapped = gpu_stream_time(r, "int4-g32", used, EXPERT_BYTES)
    assert overlapped == pytest.approx(STREAM_LATENCY_S + gather)
    one_slot = gpu_stream_time(r, "int4-g32", used, EXPERT_BYTES, slot_bytes=40 * EXPERT_BYTES)
    assert one_slot == pytest.approx(STREAM_LATENCY_S + gather + copy + compute)  # no overlap
    two = gpu_stream_time(r, "int4-g32", used, EXPERT_BYTES, slot_bytes=20 * EXPERT_BYTES)
    assert two == pytest.approx(STREAM_LATENCY_S + gather + (copy + compute) / 2)


def test_fewest_tokens_on_the_cpu_is_best_of_every_subset():
    """Where the transfer bounds the GPU side, no other choice of experts does better than
    giving the CPU those with the fewest tokens (all 2^10 subsets)."""
    counts = np.array([1, 2, 3, 5, 8, 13, 21, 34, 55, 89])
    r = rates(h2d=8.0)
    best = math.inf
    for mask in itertools.product([False, True], repeat=len(counts)):
        on_cpu = np.array(mask)
        cpu = cpu_time(r, "int4-g32", counts[on_cpu])
        best = min(best, max(cpu, gpu_stream_time(r, "int4-g32", counts[~on_cpu], EXPERT_BYTES)))
    s = split(r, "int4-g32", counts, EXPERT_BYTES)
    assert s.mode == "split" and s.seconds == pytest.approx(best)


def test_edge_cases():
    for counts in (np.zeros(256), np.zeros(0)):  # no expert used; a layer of none
        s = split(rates(), "int4-g32", counts, EXPERT_BYTES)
        assert s.mode == "cpu" and s.seconds == 0 and s.on_cpu.all()
        assert s.on_cpu.shape == counts.shape
    assert cpu_time(rates(), "int4-g32", np.zeros(8)) == 0
    assert gpu_stream_time(rates(), "int4-g32", np.zeros(8), EXPERT_BYTES) == 0
    one = np.zeros(256)
    one[17] = 1  # one expert, one token: the CPU
    s = split(rates(), "int4-g32", one, EXPERT_BYTES)
    assert s.mode == "cpu" and s.on_cpu.all()
    one[17] = 100_000  # one expert, very many tokens: worth its bytes over PCIe
    s = split(rates(), "int4-g32", one, EXPERT_BYTES)
    assert s.mode == "gpu" and not s.on_cpu[17] and s.on_cpu.sum() == 255
    with pytest.raises(ValueError, match="token counts"):
        split(rates(), "int4-g32", np.array([1, -1]), EXPERT_BYTES)
    with pytest.raises(ValueError, match="token counts"):
        split(rates(), "int4-g32", np.ones((2, 2)), EXPERT_BYTES)


def test_staging_is_charged_to_the_cpu_side():
    counts = np.full(256, 64)
    r = rates(h2d=51.0, stage=20.0)
    s = split(r, "int4-g32", counts, EXPERT_BYTES)
    gather = 256 * EXPERT_BYTES / 20e9  # slower than PCIe: the pipeline's slowest stage
    assert s.mode == "gpu"
    assert s.cpu_s == pytest.approx(gather + STREAM_LATENCY_S)  # the engine's worker gathers
    assert s.gpu_s == pytest.approx(gather + STREAM_LATENCY_S)
    # with nothing to gather (weights already pinned), the CPU's cores are free to take the
    # experts with the fewest tokens while PCIe carries the rest
    unstaged = split(r, "int4-g32", counts, EXPERT_BYTES, staged=False)
    assert unstaged.mode == "split" and unstaged.seconds < s.seconds


def test_unknown_format_names_what_was_measured():
    with pytest.raises(CalibrationError, match="no CPU cost for int8.*int4-g32"):
        split(rates(), "int8", np.ones(4), EXPERT_BYTES)


def test_expert_cost_interpolates_and_extrapolates():
    c = ExpertCost((1, 4, 16), (1.0, 2.0, 5.0), call_s=0.5)
    assert c.expert_s(1) == 1.0 and c.expert_s(4) == 2.0
    assert c.expert_s(2.5) == pytest.approx(1.5)
    assert c.expert_s(0.5) == 1.0  # below the table: its first point
    assert c.expert_s(28) == pytest.approx(5.0 + 12 * 0.25)  # the last segment's slope
    assert c.call([0, 1, 4]) == pytest.approx(0.5 + 1.0 + 2.0)
    assert c.call([0, 0]) == 0.0
    assert ExpertCost.from_dict(c.to_dict()) == c
    with pytest.raises(CalibrationError, match="must rise"):
        ExpertCost((4, 1), (1.0, 2.0))
    with pytest.raises(CalibrationError, match=">= 0"):
        ExpertCost((1,), (-1.0,))
