"""Long prefill's streamed experts (hetero.sched.streaming through cpu_experts.staging): only the
routed experts cross, in groups bounded by the staging slot, and the sum equals the CPU engine's
(here the "device" is the CPU: the same staging code, each group dequantized: the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, pack_experts
from hetero.cpu_experts.staging import GroupStaging, gather_rows, group_rows
from hetero.sched.streaming import stream_experts

TOL = 1e-5
E, I, H = 12, 64, 128


@pytest.fixture(scope="module", params=["int4", "int8", "bf16"])
def engine(request):
    g = torch.Generator().manual_seed(0)
    layer = pack_experts(
        torch.randn(E, I, H, generator=g),
        torch.randn(E, I, H, generator=g),
        torch.randn(E, H, I, generator=g),
        Format.parse(request.param),
    )
    config = EngineConfig(threads=2, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9)
    engine = CPUExperts({0: layer}, config)
    yield engine
    engine.close()


def routing(T: int, k: int, seed: int, experts: int = E) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(T, experts, generator=g).topk(k, dim=-1).indices
    rows[::3, 0] = -1  # computed elsewhere
    return rows, torch.rand(T, k, generator=g)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("per_group", [1, 3, 12])
def test_streamed_groups_equal_the_engine(engine, per_group, direct):
    """1, 3 or all experts a group: the slots are reused (double buffering) and the sum is the
    engine's; `direct`: the rows copied from the arrays themselves (runs of consecutive rows),
    not gathered into a host slot first."""
    layer = engine.layers[0]
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(1))
    rows, w = routing(24, 3, per_group)
    slot = per_group * layer.expert_bytes() + 4 * 64
    staging = GroupStaging(slot, "cpu", direct=direct)
    sent = []
    fill = staging.fill

    def recording_fill(s, packed, group_rows_):
        sent.append((s, list(group_rows_)))
        return fill(s, packed, group_rows_)

    staging.fill = recording_fill
    got = stream_experts(engine, staging, 0, x, rows, w)
    want = engine.forward(0, x, rows, w)
    assert ((got - want).norm() / want.norm()).item() < TOL
    routed = sorted(set(rows[rows >= 0].tolist()))
    assert sorted(r for _, group in sent for r in group) == routed  # each routed expert once
    assert all(len(group) <= per_group for _, group in sent)
    assert [s for s, _ in sent] == [i % 2 for i in range(len(sent))]  # the two slots in turn


@pytest.mark.parametrize("per_group", [1, 5, 12])  # 12, 3 and 1 group(s)
def test_after_fills_runs_once_every_gather_is_queued(engine, per_group):
    """The split chunk's CPU job goes on the engine's worker once, behind the last group's
    gather (so it runs beside the GPU's compute, not before a gather the copies wait for)."""
    layer = engine.layers[0]
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(2))
    rows, w = routing(24, 3, seed=2)
    staging = GroupStaging(per_group * layer.expert_bytes() + 4 * 64, "cpu")
    events, fill = [], staging.fill

    def recording_fill(s, packed, group_rows_):
        events.append("fill")
        return fill(s, packed, group_rows_)

    staging.fill = recording_fill
    after = []  # as the split chunk does: its CPU job queued on the worker, behind the fills
    job = lambda: after.append(engine.on_worker(events.append, "after"))  # noqa: E731
    got = stream_experts(engine, staging, 0, x, rows, w, job)
    after[0].result()
    routed = len(set(rows[rows >= 0].tolist()))
    groups = -(-routed // per_group)
    assert events == ["fill"] * groups + ["after"] and len(after) == 1
    want = engine.forward(0, x, rows, w)
    assert ((got - want).norm() / want.norm()).item() < TOL


def test_only_routed_experts_and_none(engine):
    x = torch.randn(4, H)
    rows = torch.full((4, 2), -1)
    rows[1, 0] = 5  # one expert, one token
    w = torch.rand(4, 2)
    staging = GroupStaging(engine.layers[0].expert_bytes() + 4 * 64, "cpu")
    got, want = stream_experts(engine, staging, 0, x, rows, w), engine.forward(0, x, rows, w)
    assert want[1].any() and ((got - want).norm() / want.norm()).item() < TOL
    assert not stream_experts(engine, staging, 0, x, torch.full((4, 2), -1), w).any()


def test_gather_and_grouping():
    src = np.arange(7 * 300, dtype=np.uint8).reshape(7, 300)
    rows = np.array([6, 0, 3], dtype=np.int64)
    dst = np.zeros((3, 300), dtype=np.uint8)
    gather_rows(src, rows, dst)
    assert (dst == src[rows]).all()
    groups = group_rows(np.arange(10), expert_bytes=100, slot_bytes=350)
    assert [list(g) for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="holds no expert.*staging_gb"):
        group_rows(np.arange(3), expert_bytes=100, slot_bytes=99)


def test_hybrid_layer_streams_through_the_staging(engine):
    """HybridExperts._streamed (what long prefill takes on CUDA) with a staging: the engine's
    sum, GPU-resident experts excluded from what crosses."""
    from torch import nn

    from hetero.sched.hybrid import HybridExperts

    layer = engine.layers[0]
    staging = GroupStaging(2 * layer.expert_bytes() + 4 * 64, "cpu")
    routed = HybridExperts(nn.ModuleDict(), layer=0, engine=engine, num_experts=E, staging=staging)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, H, generator=g)
    ids = torch.rand(16, E, generator=g).topk(4, dim=-1).indices  # (a router's: no -1)
    w = torch.rand(16, 4, generator=g)
    got = routed._streamed(x, ids, w).result()
    want = engine.forward(0, x, ids, w)
    assert ((got - want).norm() / want.norm()).item() < TOL


def policy_rates(fmt: str, mode: str):
    """Rates under which prefill_policy.split picks `mode` for the counts of `skewed`."""
    from hetero.sched.rates import ExpertCost, Rates

    ms = 1e-3
    steep = ExpertCost((1, 64), (1 * ms, 64 * ms))  # the CPU: a token costs
    flat = ExpertCost((1, 64), (1 * ms, 1 * ms))  # the GPU: an expert costs, not its tokens
    if mode == "cpu":
        return Rates((H, I), 100.0, cpu={fmt: steep})  # no GPU
    cpu = steep if mode == "split" else ExpertCost((1, 64), (100 * ms, 6400 * ms))
    return Rates((H, I), 100.0, h2d_gbps=1000.0, hbm_gbps=1000.0, gpu_tflops=1.0,
                 cpu={fmt: cpu}, gpu={fmt: flat})  # fmt: skip


def skewed(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the experts get most tokens, the other half one or two each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E // 2, (T, 4), generator=g)
    ids[:6, 0] = torch.arange(E // 2, E // 2 + 6)  # (the cold half: a token or two each)
    return ids, torch.rand(T, 4, generator=g)


@pytest.mark.parametrize("mode", ["cpu", "gpu", "split"])
def test_the_prefill_policy_paths_equal_the_engine(engine, mode):
    """HybridExperts._by_policy (long chunks, with measured rates) takes each of split's modes;
    the split one computes the CPU's experts on the engine beside the streamed rest."""
    from torch import nn

    from hetero.sched.hybrid import HybridExperts

    layer = engine.layers[0]
    staging = GroupStaging(2 * layer.expert_bytes() + 4 * 64, "cpu")
    rates = policy_rates(str(layer.fmt), mode)
    routed = HybridExperts(nn.ModuleDict(), layer=0, engine=engine, num_experts=E,
                           staging=staging, rates=rates)  # fmt: skip
    ids, w = skewed(64, seed=4)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(4))
    got = routed._by_policy(x, ids, w).result()
    want = engine.forward(0, x, ids, w)
    assert dict(routed.modes) == {mode: 1}
    assert routed.last_split.mode == mode
    assert ((got - want).norm() / want.norm()).item() < TOL


def test_page_locked_experts_put_decode_sized_steps_on_the_policy(engine):
    """With direct staging (runtime.pin_experts: no gather on the CPU) steps from
    DIRECT_POLICY_MIN_TOKENS tokens ask the policy; with gathered staging only from
    POLICY_MIN_TOKENS. Below the threshold a step takes the ordinary path (last_split None),
    at it the policy's split, both equal to the engine's sum."""
    from torch import nn

    from hetero.sched.hybrid import DIRECT_POLICY_MIN_TOKENS, POLICY_MIN_TOKENS, HybridExperts

    layer = engine.layers[0]
    rates = policy_rates(str(layer.fmt), "split")

    def routed(direct: bool) -> HybridExperts:
        staging = GroupStaging(2 * layer.expert_bytes() + 4 * 64, "cpu", direct=direct)
        return HybridExperts(nn.ModuleDict(), layer=0, engine=engine, num_experts=E,
                             staging=staging, rates=rates)  # fmt: skip

    assert routed(False).policy_min_tokens == POLICY_MIN_TOKENS
    pinned = routed(True)
    assert pinned.policy_min_tokens == DIRECT_POLICY_MIN_TOKENS < POLICY_MIN_TOKENS
    for T, asks in [(DIRECT_POLICY_MIN_TOKENS - 1, False), (DIRECT_POLICY_MIN_TOKENS, True)]:
        ids, w = skewed(T, seed=T)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        got = pinned.submit(x, ids, w).result()
        want = engine.forward(0, x, ids, w)
        assert (pinned.last_split is not None) == asks
        assert ((got - want).norm() / want.norm()).item() < TOL
    assert dict(pinned.modes) == {"split": 1}
    on_cpu = pinned.last_split.on_cpu  # the CPU kept the experts with the fewest tokens
    counts = np.bincount(ids.flatten().numpy(), minlength=E)
    assert counts[on_cpu & (counts > 0)].max() <= counts[~on_cpu].min()


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_a_group_through_the_fused_kernel_on_its_own_pairs(spec):
    """streaming.fused_group (CUDA's path; here in Triton's interpreter): the group's pairs
    gathered, the fused kernel on them, added back a slot at a time: the dequantized
    reference's sum."""
    pytest.importorskip("triton")
    from hetero.cpu_experts.formats import as_tensor
    from hetero.sched.hybrid import dequantized_experts
    from hetero.sched.streaming import fused_group

    h, i, e, T, k = 256, 128, 10, 9, 3
    g = torch.Generator().manual_seed(7)
    fmt = Format.parse(spec)
    scale = (h**-0.5, i**-0.5)
    layer = pack_experts(torch.randn(e, i, h, generator=g) * scale[0],
                         torch.randn(e, i, h, generator=g) * scale[0],
                         torch.randn(e, h, i, generator=g) * scale[1], fmt)  # fmt: skip
    group = [7, 2, 5, 3]  # the slot's rows, as a group holds them
    arrays = [as_tensor(a)[group] for a in layer.arrays().values()]
    local = torch.full((e,), -1, dtype=torch.int32)
    local[group] = torch.arange(len(group), dtype=torch.int32)
    rows = torch.rand(T, e, generator=g).topk(k, dim=-1).indices
    rows[0, 1] = -1  # (elsewhere)
    w, x = torch.rand(T, k, generator=g), torch.randn(T, h, generator=g)
    got = fused_group(fmt, x, rows, w, local, arrays)
    in_group = local[rows.clamp_min(0)].long().masked_fill(rows < 0, -1)
    want = dequantized_experts(layer, x, in_group, w, arrays).float()
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("spec", ["int4", "int8", "bf16"])
def test_streamed_experts_equal_the_engine(spec):
    """Long prefill's path (the packed layer dequantized where x lives) computes what the CPU
    engine computes, here both on the CPU in fp32."""
    from hetero.cpu_experts.engine import CPUExperts, EngineConfig
    from hetero.cpu_experts.formats import Format, pack_experts
    from hetero.sched.hybrid import streamed_experts

    g = torch.Generator().manual_seed(0)
    E, I, H = 6, 64, 128
    layer = pack_experts(
        torch.randn(E, I, H, generator=g),
        torch.randn(E, I, H, generator=g),
        torch.randn(E, H, I, generator=g),
        Format.parse(spec),
    )
    x = torch.randn(20, H, generator=g)
    rows = torch.rand(20, E, generator=g).topk(3, dim=-1).indices
    rows[::4, 0] = -1  # experts computed elsewhere
    w = torch.rand(20, 3, generator=g)
    engine = CPUExperts(
        {0: layer}, EngineConfig(threads=2, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9)
    )
    try:
        want = engine.forward(0, x, rows, w)
        staged = engine.stage(0, x.device)  # through the engine's (pinnable) buffer
        got = streamed_experts(layer, x, rows, w, staged)
    finally:
        engine.close()
    assert ((got - want).norm() / want.norm()).item() < TOL
    assert ((streamed_experts(layer, x, rows, w) - want).norm() / want.norm()).item() < TOL


def test_own_pages_gives_small_arrays_pages_of_their_own(engine, monkeypatch):
    """Before locking: small arrays copied into whole pages of their own (the same values,
    shared ones still shared), arrays from OWN_PAGES_BYTES up kept as they are."""
    import mmap

    from hetero.cpu_experts import staging
    from hetero.cpu_experts.staging import own_pages

    layer = engine.layers[0]
    out = own_pages({0: layer, 1: layer})
    assert out[0].w13 is out[1].w13  # one copy of a shared array
    for name, a in layer.arrays().items():
        b = out[0].arrays()[name]
        assert np.array_equal(a, b) and a.dtype == b.dtype
        if a.nbytes:
            assert b is not a and b.ctypes.data % mmap.PAGESIZE == 0
    monkeypatch.setattr(staging, "OWN_PAGES_BYTES", 1)
    kept = own_pages({0: layer})[0]
    assert all(kept.arrays()[k] is a for k, a in layer.arrays().items())


@pytest.mark.gpu
def test_register_host_locks_pages_and_releases_them(engine):
    """A layer's arrays, in pages of their own, are locked, streamed from in place (direct
    staging) to the engine's sum, unlocked, and locked again as a second load in one process
    does."""
    from hetero.cpu_experts.staging import own_pages, register_host

    layer = own_pages({0: engine.layers[0]})[0]
    arrays = list(layer.arrays().values())
    staging = GroupStaging(2 * layer.expert_bytes() + 4 * 64, "cuda", direct=True)
    ids, w = skewed(24, seed=6)
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(6))
    want = engine.forward(0, x, ids, w)
    config = EngineConfig(threads=2, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9)
    own = CPUExperts({0: layer}, config)
    try:
        for _ in range(2):
            pinned = register_host([layer])
            assert pinned.nbytes == sum(a.nbytes for a in arrays)
            assert 0 < len(pinned.ranges) <= len(arrays)
            got = stream_experts(own, staging, 0, x.cuda(), ids.cuda(), w.cuda()).cpu()
            assert ((got - want).norm() / want.norm()).item() < TOL
            pinned.release()
    finally:
        own.close()
