"""The CPU expert engine around the kernels: jobs and their parts, the worker thread and the
GIL, the inputs' flag, host buffers, warm-up and numba's disk cache, huge pages."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cpu_experts import FP32_TOL, Q8_H, Q8_I, E, expert_weights, reference, rel_err, routing

from hetero.cpu_experts import ops
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, pack_experts


@pytest.fixture(scope="module")
def weights():
    return expert_weights()


@pytest.mark.parametrize(
    "module", ["kernels_q8", "fused", "kernels_amx", "kernels_amx_bf16", "ring"]
)
def test_cached_kernels_name_the_hashes_of_what_they_compile_in(module):
    """numba caches a module's kernels by its own file alone; the kernels of these modules
    compile in code from other files, so a change there must come with a new hash in DEPENDS
    here (which also changes this file and so rebuilds the cache)."""
    import importlib

    mod = importlib.import_module(f"hetero.cpu_experts.{module}")
    here = Path(mod.__file__).parent
    found = {
        name: hashlib.sha256((here / name).read_bytes()).hexdigest()[:16] for name in mod.DEPENDS
    }
    assert mod.DEPENDS == found, f"{module}.py: set DEPENDS = {found!r}"


def test_caller_keeps_running_python_while_kernel_runs():
    """With a 60 s GIL switch interval, a kernel that held the GIL would keep this thread from
    running until it finished; nogil kernels let it run Python while the job is in flight."""
    H2, I2, E2, T = 1024, 512, 16, 1024
    g = torch.Generator().manual_seed(0)
    layer = pack_experts(
        torch.randn(E2, I2, H2, generator=g),
        torch.randn(E2, I2, H2, generator=g),
        torch.randn(E2, H2, I2, generator=g),
        Format.parse("bf16"),
    )
    eng = CPUExperts(
        {0: layer}, EngineConfig(threads=1, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9)
    )
    x, ids = torch.randn(T, H2, generator=g), torch.arange(T * 4).view(T, 4) % E2
    old = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        job = eng.submit(0, x, ids, torch.ones(T, 4))
        time.sleep(0.05)  # blocks, so the worker takes the GIL and enters the kernel
        total = sum(i for i in range(200_000))  # Python work on this thread...
        in_flight = not job.done[0]  # ...done while the kernel is still running
    finally:
        sys.setswitchinterval(old)
    eng.wait(job)
    eng.close()
    assert total > 0 and in_flight


@pytest.mark.parametrize("T", [3, 9])  # GEMV path in one call; GEMM path part by part
def test_job_parts_and_rows(weights, T):
    """A deferred job: part 1 is each token's lowest-weight CPU slot (d = -1; with d = 1 only
    where no token's part 0 reads that expert), part 0 the rest, and the two add up to the
    whole layer; `rows` maps experts to engine rows (-1: not the CPU's)."""
    layer = pack_experts(*weights, Format.parse("int8"))
    eng = CPUExperts({0: layer}, EngineConfig(threads=2, gemm_min_tokens=6))
    try:
        x, ids, wt = routing(T, 4, seed=5)
        rows = np.arange(E)
        low = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, wt.argmin(1, keepdim=True), True)
        read_now = torch.isin(ids, ids[~low])  # [T, k] its expert is in some token's part 0
        for d, later_mask in ((-1, low), (1, low & ~read_now)):
            job = eng.submit(0, x, ids, wt, rows, deferred=d)
            later, now = eng.wait(job, 1), eng.wait(job, 0)
            want = eng.forward(0, x, ids.masked_fill(~later_mask, -1), wt)
            torch.testing.assert_close(later, want)
            torch.testing.assert_close(now, eng.forward(0, x, ids.masked_fill(later_mask, -1), wt))
        # rows: expert 2 is elsewhere (-1), the others' rows shifted by one place
        shifted = np.array([1, 2, -1, 4, 5, 6, 7, 0])
        got = eng.wait(eng.submit(0, x, ids, wt, shifted))
        moved = torch.from_numpy(np.append(shifted, -1))[ids]  # ids -1 stay -1
        torch.testing.assert_close(got, eng.forward(0, x, moved, wt))
        with pytest.raises(ValueError, match="engine rows below 8"):
            eng.submit(0, x, ids, wt, rows + 1)
        assert eng.forward(0, x, ids, wt).shape == x.shape  # the worker lives on
    finally:
        eng.close()


def test_host_views_share_one_buffer_without_overlap():
    from hetero.cpu_experts.host_buffers import host_views

    like = [torch.empty(3, 5), torch.empty(3, 2, dtype=torch.long), torch.empty(0, 7),
            torch.empty(2, 3, 5)]  # fmt: skip
    views = host_views([(t.shape, t.dtype) for t in like], pin=False)
    base = views[0].untyped_storage().data_ptr()
    spans = []
    for v, t in zip(views, like):
        assert v.shape == t.shape and v.dtype == t.dtype and v.is_contiguous()
        assert v.untyped_storage().data_ptr() == base
        if v.numel():  # (an empty view's pointer means nothing)
            assert v.data_ptr() % 64 == 0
            spans.append((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()))
    for v, value in zip(views, (1, 2, 3, 4)):
        v.fill_(value)
    assert all((v == value).all() for v, value in zip(views, (1, 2, 3, 4)))  # no overlap
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("spec", ["int4@q8", "int8"])  # both fused wrappers
def test_decode_kernel_waits_for_its_inputs_flag(weights, spec):
    """The decode kernel starts once `ready` is set (as the CUDA stream sets it after the input
    copies), reports the time it waited, and gives up with an error if it never comes."""
    import threading

    from hetero.cpu_experts.kernels_q8 import cycle_rate as _cycle_rate

    fmt, q8 = (spec[:-3], True) if spec.endswith("@q8") else (spec, False)
    g = torch.Generator().manual_seed(4)
    w = [torch.randn(E, Q8_I, Q8_H, generator=g) for _ in range(2)]
    layer = pack_experts(*w, torch.randn(E, Q8_H, Q8_I, generator=g), Format.parse(fmt))
    x, ids, wt = (t.numpy() for t in routing(3, 2, seed=6, hidden=Q8_H))
    rows = np.arange(E)

    def run(ready, max_wait=1 << 40):
        outs, done = np.zeros((1, 3, Q8_H), np.float32), np.zeros(1, np.int64)
        waited = ops.moe_layer(layer, x, ids, wt, rows, 0, outs, done, 16, q8, 0, ready, max_wait)
        return outs, done, waited

    want, _, _ = run(None)
    ready, result = np.zeros(1, np.int64), {}
    worker = threading.Thread(target=lambda: result.update(out=run(ready)))
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive()  # still waiting
    ready[0] = 1
    worker.join(30)
    outs, done, waited = result["out"]
    np.testing.assert_array_equal(outs, want)
    assert done[0] == 1 and waited / _cycle_rate() >= 0.04
    with pytest.raises(RuntimeError, match="inputs did not arrive"):
        run(np.zeros(1, np.int64), max_wait=int(0.01 * _cycle_rate()))


def test_warm_up_compiles_at_load(weights):
    """After construction, the first request runs without compiling (the kernels are typed)."""
    from hetero.cpu_experts import kernels

    layer = pack_experts(*weights, Format.parse("int4"))
    eng = CPUExperts({0: layer}, EngineConfig(threads=2))
    before = {k.__name__: len(k.signatures) for k in (kernels.moe_gemv, kernels.group_by_expert)}
    x, ids, w = routing(4, 2)
    eng.forward(0, x, ids, w)
    after = {k.__name__: len(k.signatures) for k in (kernels.moe_gemv, kernels.group_by_expert)}
    assert before == after and all(before.values())
    eng.close()


def test_numba_disk_cache_is_used(tmp_path):
    """A second process loads the compiled kernels, and the fused decode wrappers, from numba's
    cache instead of compiling."""
    import subprocess

    code = "\n".join(
        [
            "import torch",
            "from hetero.cpu_experts.engine import CPUExperts, EngineConfig",
            "from hetero.cpu_experts.formats import Format, pack_experts",
            "from hetero.cpu_experts import fused as f, kernels as k, kernels_q8 as q",
            "w = torch.randn(4, 32, 64), torch.randn(4, 32, 64), torch.randn(4, 64, 32)",
            "layer = pack_experts(*w, Format.parse('int8'))",
            "CPUExperts({0: layer}, EngineConfig(threads=1)).close()",
            "w = torch.randn(4, 128, 128), torch.randn(4, 128, 128), torch.randn(4, 128, 128)",
            "layer = pack_experts(*w, Format.parse('int4'))",  # kernels_q8
            "CPUExperts({0: layer}, EngineConfig(threads=1)).close()",
            "stats = [k.moe_gemv.stats, q.moe_gemv_q8.stats, f.moe_layer_q8.stats,",
            "         f.moe_layer.stats, f.wait_inputs.stats]",
            "print(sum(sum(s.cache_hits.values()) for s in stats),",
            "      sum(sum(s.cache_misses.values()) for s in stats))",
        ]
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    first, second = (tuple(map(int, r.stdout.split())) for r in runs)
    assert first[1] >= 5 and second == (first[1], 0)


def test_software_prefetch_changes_nothing_but_timing():
    """Prefetching past a row (even past the array: prefetches never fault) gives equal output."""
    g = torch.Generator().manual_seed(8)
    w = [torch.randn(E, Q8_I, Q8_H, generator=g) for _ in range(2)]
    layer = pack_experts(*w, torch.randn(E, Q8_H, Q8_I, generator=g), Format.parse("int4"))
    x, ids, wt = routing(21, 3, seed=9, hidden=Q8_H)
    outs = []
    for ahead in (0, 1 << 20):
        config = EngineConfig(threads=2, gemm_min_tokens_q8=10**9, prefetch_bytes=ahead)
        eng = CPUExperts({0: layer}, config)
        outs.append(eng.forward(0, x, ids, wt))
        eng.close()
    assert torch.equal(outs[0], outs[1])


def test_engine_shortens_the_gil_switch_interval(weights):
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        layer = pack_experts(*weights, Format.parse("int8"))
        CPUExperts({0: layer}, EngineConfig(threads=1)).close()
        assert sys.getswitchinterval() == pytest.approx(EngineConfig.gil_switch_s, abs=2e-6)
        CPUExperts({0: layer}, EngineConfig(threads=1, gil_switch_s=0.01)).close()
        assert sys.getswitchinterval() == pytest.approx(
            EngineConfig.gil_switch_s, abs=2e-6
        )  # never up
    finally:
        sys.setswitchinterval(before)


def test_hugepage_copies_change_nothing_but_timing(weights):
    from hetero.cpu_experts.host_buffers import HUGE_PAGE, in_hugepages

    layer = pack_experts(*weights, Format.parse("int4"))
    moved = in_hugepages(layer)
    for a, b in zip(layer.arrays().values(), moved.arrays().values()):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert b.ctypes.data % HUGE_PAGE == 0  # each array starts on a huge page
    x, ids, w = routing(13, 2)
    outs = []
    for huge in (False, True):
        eng = CPUExperts({0: layer}, EngineConfig(threads=2, hugepages=huge))
        outs.append(eng.forward(0, x, ids, w))
        eng.close()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [False, True])
def test_cuda_jobs_recycle_their_pinned_buffers(weights, ring):
    """A CUDA caller's job buffer (a pinned block, or a slot of the decode ring) goes back to
    the engine once every part has been waited for and the copy out of it has run: later jobs
    reuse it, its flag zeroed first (a recycled 1 would start the kernel on stale inputs), and
    results stay exact."""
    layer = pack_experts(*weights, Format.parse("int4"))
    eng = CPUExperts({0: layer}, EngineConfig(threads=2, ring=ring))
    try:
        outs, ptrs = [], []
        for seed in range(6):  # (the ring has 4 slots)
            x, ids, wt = (t.cuda() for t in routing(3, 2, seed=seed))
            job = eng.submit(0, x, ids, wt, deferred=1)
            ptrs.append(job.outs.data_ptr())
            outs.append((eng.wait(job, 0) + eng.wait(job, 1)).cpu())
            torch.cuda.synchronize()
            ref = reference(layer, x.cpu(), ids.cpu(), wt.cpu())
            assert rel_err(outs[-1], ref) < FP32_TOL
        assert len(set(ptrs)) < len(ptrs)  # buffers were reused
    finally:
        eng.close()
