"""The decode ring (ring.py): jobs served by one numba loop give what the worker's queue gives,
whatever the mix of jobs, and its server comes and goes with the work."""

from __future__ import annotations

import time

import pytest
import torch

from hetero.cpu_experts import engine as engine_mod
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, pack_experts
from hetero.cpu_experts.ring import ACTIVE, SLOTS

H, I, E, K = 256, 128, 16, 4
# every expert on the GEMV (the ring's path) whatever its tokens, on and off the ring: bit-equal
GEMV = dict(gemm_min_tokens_q8=10**6, gemm_min_tokens_amx=10**6)


@pytest.fixture(scope="module")
def engines():
    g = torch.Generator().manual_seed(0)
    layers = {
        L: pack_experts(
            *(torch.randn(E, *s, generator=g) for s in ((I, H), (I, H), (H, I))),
            Format.parse("int4"),
        )  # fmt: skip
        for L in (3, 4, 5)
    }
    ring = CPUExperts(layers, EngineConfig(threads=2, **GEMV))
    plain = CPUExperts(layers, EngineConfig(threads=2, ring=False, **GEMV))
    yield ring, plain
    ring.close()
    plain.close()


def job(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(K).indices
    return torch.randn(T, H, generator=g), ids, torch.rand(T, K, generator=g)


def idle_out(r, within_s: float = 5.0) -> bool:
    """Whether the ring's server returns to Python within `within_s` of now (it should after
    RING_IDLE_S without a job)."""
    deadline = time.time() + within_s
    while r.ctrl[ACTIVE] and time.time() < deadline:
        time.sleep(0.005)
    return r.ctrl[ACTIVE] == 0


def test_ring_jobs_equal_the_queue_path(engines):
    """Decode sizes on the ring (up to EngineConfig.ring_tokens: a decode step of 64
    requests), more tokens off it, more jobs in flight than slots (the rest take the queue),
    with and without deferred parts: bit-equal outputs."""
    ring, plain = engines
    top = ring._ring_tokens
    assert top == EngineConfig.ring_tokens == 64 and plain._ring_tokens == 0
    before = {k: r.seq for k, r in ring._rings.items()}
    for T in (1, 3, 16, top, top + 1):
        x, ids, w = job(T, T)
        for d in (0, 2):
            layers = (3, 4, 5) * 2  # 6 jobs in flight, SLOTS = 4
            a = [ring.submit(L, x, ids, w, deferred=d) for L in layers]
            b = [plain.submit(L, x, ids, w, deferred=d) for L in layers]
            for part in range(2 if d else 1):
                for ja, jb in zip(a, b):
                    assert torch.equal(ring.wait(ja, part), plain.wait(jb, part)), (T, d, part)
    served = ring._rings[K].seq - before.get(K, 0)
    assert SLOTS <= served < 3 * 2 * 6  # some on the ring, some off it


def test_a_callers_result_outlives_its_slot(engines):
    ring, plain = engines
    x, ids, w = job(2, 7)
    y = ring.forward(3, x, ids, w)
    kept = y.clone()
    for i in range(3 * SLOTS):  # every slot reused
        ring.forward(4, *job(2, 100 + i))
    assert torch.equal(y, kept) and torch.equal(y, plain.forward(3, x, ids, w))


def test_buffers_made_under_inference_mode_serve_calls_without_it(engines):
    """The ring (and the queue path's buffers) first needed inside torch.inference_mode, as a
    model's forward makes them, then used outside it: no "inference tensor" error."""
    _, plain = engines
    fresh = CPUExperts(plain.layers, EngineConfig(threads=2, **GEMV))
    try:
        x, ids, w = job(2, 13)
        with torch.inference_mode():
            first = fresh.forward(3, x, ids, w)
        assert K in fresh._rings
        assert torch.equal(fresh.forward(3, x, ids, w), first)  # the same slots, written again
        assert torch.equal(fresh.forward(4, *job(40, 14)), plain.forward(4, *job(40, 14)))
    finally:
        fresh.close()


def test_the_server_idles_out_and_comes_back(engines):
    ring, plain = engines
    x, ids, w = job(1, 9)
    ring.forward(5, x, ids, w)
    assert idle_out(ring._rings[K])  # after RING_IDLE_S, the server returns to Python
    assert torch.equal(ring.forward(5, x, ids, w), plain.forward(5, x, ids, w))


def test_a_failed_job_fails_alone(engines):
    """A job the kernel refuses raises its error in `wait`; the ring goes on with the next."""
    ring, plain = engines
    x, ids, w = job(2, 11)
    bad = ring.submit(3, x, ids + E, w)  # expert ids past the layer's experts
    good = ring.submit(4, x, ids, w)
    with pytest.raises(ValueError, match="out of range"):
        ring.wait(bad)
    assert torch.equal(ring.wait(good), plain.forward(4, x, ids, w))


def test_inputs_that_never_land_fail_the_job(engines, monkeypatch):
    """A CUDA caller's inputs are flagged by its stream; if the flag never comes, the job fails
    after INPUT_TIMEOUT_S with a clear error (here the flag is withheld by hand)."""
    ring, _ = engines
    monkeypatch.setattr(engine_mod, "INPUT_TIMEOUT_S", 0.05)
    r = ring._rings[K]
    assert idle_out(r)  # the next server picks the timeout up
    s = r.take()
    r.fill(s, 3, 1, 0, ring._identity.setdefault(3, torch.arange(E).numpy()))
    future = engine_mod.RingFuture(r, s, r.seq)
    if r.publish():
        ring._pool.submit(ring._serve, r)
    deadline = time.time() + 10
    while not future.done() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="did not arrive"):
        future.result()
    r.release(s, None)


def test_two_callers_at_once(engines):
    """Submits from two threads never share a slot: each gets its own job's sums."""
    from concurrent.futures import ThreadPoolExecutor

    ring, plain = engines

    def calls(first: int) -> list[bool]:
        out = []
        for i in range(12):
            x, ids, w = job(1 + i % 3, first + i)
            out.append(torch.equal(ring.forward(3 + i % 3, x, ids, w),
                                   plain.forward(3 + i % 3, x, ids, w)))  # fmt: skip
        return out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(calls, (1000, 2000)))
    assert all(all(r) for r in results)


def test_a_dropped_job_frees_its_slot(engines):
    """A caller that drops a job without waiting (an error mid-step) does not keep its slot:
    once the job has run and is collected, the slot serves again."""
    import gc

    ring, _ = engines
    r = ring._rings[K]
    gc.collect()  # (jobs of the tests before, held by their tracebacks)
    assert not any(r.busy)
    x, ids, w = job(1, 21)
    j = ring.submit(3, x, ids, w, deferred=2)
    s = j.future.slot
    while not j.future.done():
        time.sleep(0.001)
    assert r.busy[s]
    del j
    gc.collect()
    assert not r.busy[s]


def test_ring_limit_sends_larger_jobs_to_the_queue(engines):
    """`ring_limit` (bench/throughput.py's A/B of the ring's size) lowers the tokens a ring
    job may have at run time: a job above it takes the worker's queue, with the same sums."""
    ring, plain = engines
    r = ring._rings[K]
    x, ids, w = job(20, 31)
    try:
        ring.ring_limit = 10**6
        assert ring.ring_limit == ring._ring_tokens  # no more than a slot holds
        for limit, on_ring in ((64, True), (15, False)):
            ring.ring_limit = limit
            seq = r.seq
            assert torch.equal(ring.forward(3, x, ids, w), plain.forward(3, x, ids, w))
            assert (r.seq > seq) == on_ring
    finally:
        ring.ring_limit = ring._ring_tokens


def test_a_job_with_a_heavy_expert_is_handed_to_the_gemm_paths():
    """A ring job where one expert has the GEMM threshold's tokens (a decode step of many
    requests under a skewed router) is computed on the worker's GEMM paths, with the queue
    path's sums; the ring goes on with the next jobs."""
    g = torch.Generator().manual_seed(5)
    layers = {
        L: pack_experts(
            *(torch.randn(E, *s, generator=g) for s in ((I, H), (I, H), (H, I))),
            Format.parse("int4"),
        )  # fmt: skip
        for L in (3, 4)
    }
    ring = CPUExperts(layers, EngineConfig(threads=2))
    plain = CPUExperts(layers, EngineConfig(threads=2, ring=False))
    try:
        heavy = ring.ring_heavy  # the GEMM threshold: 16 with AMX tiles, else 32
        assert heavy == ring._threshold(layers[3])
        x, ids, w = job(48, 41)
        for t in range(heavy):  # expert 2 in each of the first `heavy` tokens, once
            ids[t] = torch.tensor([2] + [3 + (t + j) % 13 for j in range(K - 1)])
        light = job(8, 42)  # at most 8 tokens an expert: the ring's GEMV
        jobs = [(3, x, ids, w), (4, *light), (4, x, ids, w), (3, *light)]
        a = [ring.submit(*j) for j in jobs]
        same = [torch.equal(ring.wait(ja), plain.forward(*j)) for ja, j in zip(a, jobs)]
        assert same == [True] * 4
        assert ring.stats.handed_back == 2 and ring._rings[K].seq == 4
        bad = ids.clone()
        bad[-1, 1] = E + 3  # an id past the layer's experts, in a job that is handed back
        failing, after = ring.submit(3, x, bad, w), ring.submit(4, *light)
        with pytest.raises(ValueError, match="out of range"):
            ring.wait(failing)
        assert torch.equal(ring.wait(after), plain.forward(4, *light))  # the ring goes on
        assert idle_out(ring._rings[K])
        ring.ring_heavy = 0  # (read as the server starts) every job on the ring's GEMV
        handed = ring.stats.handed_back
        got, want = ring.forward(3, x, ids, w), plain.forward(3, x, ids, w)  # GEMV vs GEMM
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # (their activations' rounding)
        assert ring.stats.handed_back == handed
    finally:
        ring.close()
        plain.close()
