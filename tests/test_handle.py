"""EngineHandle: the engine's step loop in its own thread, fed and read from other threads and
from asyncio, on the shipped demo model. Greedy outputs are checked against hetero.generate;
closing, releasing and failing requests: test_handle_lifecycle.py (helpers: handle_support.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from handle_support import (  # tests/handle_support.py (its fixtures: conftest.py)
    DEADLINE_S,
    DEMO,
    StepGate,
    assert_stream,
    greedy,
    tokens,
    wait_for,
)

from hetero.engine.engine import Engine, RequestError, ServingConfig
from hetero.engine.handle import EngineHandle
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams

pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")


def test_threads_submit_at_once_and_match_generate(demo, make_handle):
    prompts = [demo.ids[13 * i : 13 * i + 4 + 5 * i] for i in range(4)]
    expected = demo.reference(prompts, 8)
    h = make_handle(page_size=16, kv_cache_tokens=1024, max_num_batched_tokens=32)
    free = h.stats().pages_free
    barrier = threading.Barrier(len(prompts))
    results: dict[int, list[RequestOutput]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait(DEADLINE_S)
            rid = h.submit(prompts[i], greedy(8))
            results[i] = list(h.outputs(rid, timeout=DEADLINE_S))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for i, exp in enumerate(expected):
        assert tokens(results[i]) == exp
        assert_stream(results[i], "length")
        assert "".join(o.text for o in results[i]) == demo.tok.decode(exp)
    wait_for(lambda: h.stats().pages_free == free, "the pages to come back")
    stats = h.stats()
    assert stats.generated_tokens == 32 and stats.running == stats.waiting == 0


def test_async_streams_and_an_abort_mid_stream(demo, make_handle):
    prompts = [demo.ids[10 * i : 10 * i + 6 + i] for i in range(4)]
    expected = demo.reference(prompts, 8)
    h = make_handle(page_size=16, kv_cache_tokens=1024)
    free = h.stats().pages_free

    async def main():
        loop = asyncio.get_running_loop()
        rids = [h.submit(p, greedy(8), loop=loop) for p in prompts]
        victim = h.submit(demo.ids[100:110], greedy(500), loop=loop)

        async def read(rid: str) -> list[RequestOutput]:
            outs = []
            async for out in h.stream(rid):
                outs.append(out)
                if rid == victim and len(outs) == 2:
                    h.abort(rid)
            return outs

        streams = asyncio.gather(*(read(rid) for rid in rids + [victim]))
        return await asyncio.wait_for(streams, DEADLINE_S)

    *outs, aborted = asyncio.run(main())
    for got, exp in zip(outs, expected):
        assert tokens(got) == exp
        assert_stream(got, "length")
    assert_stream(aborted, "abort")
    assert 2 <= len(tokens(aborted)) < 500
    assert aborted[-1].token_ids == ()
    wait_for(lambda: h.stats().pages_free == free, "the aborted request's pages to come back")
    stats = h.stats()
    assert stats.running == stats.waiting == 0 and stats.pages_used == 0


def test_an_impossible_request_is_refused_at_submit(demo, make_handle):
    h = make_handle(page_size=16, kv_cache_tokens=256, max_model_len=128)
    prompt = demo.ids[:100]
    with pytest.raises(RequestError) as e:
        h.submit(prompt, greedy(29), request_id="req")
    for number in ("128", "100", "29", "129"):
        assert number in str(e.value)
    with pytest.raises(RequestError, match="empty"):
        h.submit([], greedy(), request_id="req")
    with pytest.raises(RequestError, match="9000"):
        h.submit([5, 9000], greedy(), request_id="req")
    with pytest.raises(RequestError, match="temperature"):
        h.submit([5], SamplingParams(temperature=-1), request_id="req")
    stats = h.stats()
    assert (stats.running, stats.waiting, stats.prompt_tokens, stats.steps) == (0, 0, 0, 0)
    assert not h.engine.requests

    # none of them took the id
    assert h.submit(prompt[:10], greedy(2), request_id="req") == "req"
    outs = list(h.outputs("req", timeout=DEADLINE_S))
    assert_stream(outs, "length")
    assert len(tokens(outs)) == 2


def wait_stats(h: EngineHandle, what: str, **expected) -> None:
    """Polls stats() until every named field has its expected value."""
    seen = []

    def matches() -> bool:
        seen[:] = [h.stats()]
        return all(getattr(seen[0], k) == v for k, v in expected.items())

    try:
        wait_for(matches, what)
    except AssertionError:
        raise AssertionError(f"{what}: expected {expected}, last stats {seen[0]}") from None


def test_stats_follow_the_requests(demo, make_handle, monkeypatch):
    prompt = demo.ids[:40]  # two full pages of 16 and a half
    expected = demo.reference([prompt], 4)[0]
    h = make_handle(page_size=16, kv_cache_tokens=1024, max_num_seqs=1)
    gate = StepGate(h, monkeypatch)
    a = h.submit(prompt, greedy(4))
    wait_stats(h, "a to be queued", waiting=1, running=0, steps=0)
    b = h.submit(prompt, greedy(4))  # the loop now waits at the gate: b stays in its inbox

    gate.advance()  # a is admitted and prefilled; b is queued, waiting for a seat
    wait_stats(h, "a running, b waiting", running=1, waiting=1, steps=1, generated_tokens=1,
               prompt_tokens=40, prefix_hit_tokens=0, pages_used=3)  # fmt: skip
    reader_a = h.outputs(a, timeout=DEADLINE_S)
    first_a = next(reader_a)

    gate.advance(4)  # a's last three tokens, then b's prefill, a's first two pages cached
    wait_stats(h, "b running", running=1, waiting=0, steps=5, generated_tokens=5,
               prompt_tokens=80, prefix_hit_tokens=32)  # fmt: skip
    reader_b = h.outputs(b, timeout=DEADLINE_S)
    first_b = next(reader_b)

    gate.advance(3)
    outs_a, outs_b = [first_a, *reader_a], [first_b, *reader_b]
    assert tokens(outs_a) == tokens(outs_b) == expected
    assert outs_b[-1].usage.cached_tokens == 32
    wait_stats(h, "all done", running=0, waiting=0, steps=8, generated_tokens=8, pages_used=0,
               preemptions=0, page_size=16)  # fmt: skip
    stats = h.stats()
    assert stats.pages_free == stats.pages_total
    assert stats.cpu_busy_s is None  # no CPU expert engine behind this model


def test_stats_count_the_cpu_engines_busy_seconds(demo):
    """A counter (not a share since the last read), so several readers never disturb it."""
    from types import SimpleNamespace

    cpu = SimpleNamespace(stats=SimpleNamespace(busy_s=1.5))
    engine = Engine(demo.model, demo.tok, ServingConfig(page_size=16, kv_cache_tokens=256))
    h = EngineHandle(engine, cpu_engine=cpu)
    try:
        assert h.stats().cpu_busy_s == h.stats().cpu_busy_s == 1.5
        cpu.stats.busy_s = 2.0
        assert h.stats().cpu_busy_s == 2.0
    finally:
        h.close()
