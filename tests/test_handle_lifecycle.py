"""EngineHandle's lifecycle on the demo model: close() with requests in flight or not yet picked
up, release() of a request whose caller is gone, a finished request read late, a failed step
(helpers: handle_support.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from handle_support import (  # tests/handle_support.py (its fixtures: conftest.py)
    DEADLINE_S,
    DEMO,
    assert_stream,
    greedy,
    tokens,
    wait_for,
)

from hetero.engine.handle import EngineHandle

pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")


def test_close_aborts_requests_in_flight(demo, make_handle):
    h = make_handle(page_size=16, kv_cache_tokens=2048, max_num_seqs=2)
    free = h.stats().pages_free
    rids = [h.submit(demo.ids[i : i + 8], greedy(500)) for i in (0, 30)]
    readers = [h.outputs(rid, timeout=DEADLINE_S) for rid in rids]
    firsts = [next(r) for r in readers]  # both are running
    h.close()
    for first, reader in zip(firsts, readers):
        outs = [first, *reader]
        assert_stream(outs, "abort")
        assert len(tokens(outs)) < 500
    assert h.engine.pool.num_free == free
    assert not h.engine.requests and not h.engine.has_work
    with pytest.raises(RuntimeError, match="shut down"):
        h.submit(demo.ids[:8], greedy(2))


def test_release_frees_the_pages_and_keeps_no_outputs(demo, make_handle):
    """A caller gone for good (a client that disconnected) releases its request: the pages
    come back and nothing is kept for a reader that will never come."""
    h = make_handle(page_size=16, kv_cache_tokens=2048)
    free = h.stats().pages_free
    rid = h.submit(demo.ids[:8], greedy(500))
    wait_for(lambda: h.stats().running == 1, "the request to run")
    h.release(rid)
    wait_for(lambda: h.stats().running == 0 and h.stats().pages_free == free, "the pages")
    with pytest.raises(KeyError, match="unknown request id"):
        h.outputs(rid)
    assert not h._sinks  # (nothing held for it)


def test_close_aborts_a_request_the_loop_has_not_picked_up(demo, make_handle):
    """A request submitted while the loop is inside a step is still in the inbox when close()
    is called: it is in flight all the same, and its reader must get its "abort"."""
    h = make_handle(page_size=16, kv_cache_tokens=1024)
    in_step = threading.Event()
    step = h.engine.step

    def held_until_close():
        in_step.set()
        assert h._stop.wait(DEADLINE_S)  # close() has begun
        return step()

    h.engine.step = held_until_close
    h.submit(demo.ids[:8], greedy(50))
    assert in_step.wait(DEADLINE_S)
    late = h.submit(demo.ids[30:38], greedy(8))
    reader = h.outputs(late, timeout=5)
    h.close()
    outs = list(reader)
    assert_stream(outs, "abort")
    assert tokens(outs) == []
    assert h.engine.pool.num_free == h.engine.pool.capacity


@pytest.mark.parametrize("how", ["outputs", "stream"])
def test_a_finished_request_can_still_be_read(demo, make_handle, how):
    """submit() returns at once and the request may finish before its caller starts reading
    (a short request, a busy caller): its outputs must still be there."""
    prompt = demo.ids[:12]
    expected = demo.reference([prompt], 2)[0]
    h = make_handle(page_size=16, kv_cache_tokens=1024)

    def finished() -> bool:
        stats = h.stats()
        return stats.generated_tokens == 2 and stats.running == stats.waiting == 0

    if how == "outputs":
        rid = h.submit(prompt, greedy(2))
        wait_for(finished, "the request to finish")
        outs = list(h.outputs(rid, timeout=10))
    else:

        async def main():
            rid = h.submit(prompt, greedy(2), loop=asyncio.get_running_loop())
            while not finished():
                await asyncio.sleep(0.002)
            return [out async for out in h.stream(rid)]

        outs = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert tokens(outs) == expected
    assert_stream(outs, "length")


def fail_first_run(h: EngineHandle, monkeypatch) -> None:
    run, calls = h.engine.runner.run, []

    def flaky(work):
        calls.append(len(work))
        if len(calls) == 1:
            raise RuntimeError("injected failure in the model")
        return run(work)

    monkeypatch.setattr(h.engine.runner, "run", flaky)


def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(demo, make_handle, monkeypatch):
    """The request in the failed step ends with "error" and the reason; the engine serves on."""
    prompts = [demo.ids[:10], demo.ids[20:34]]
    expected = demo.reference(prompts, 6)
    h = make_handle(page_size=16, kv_cache_tokens=1024)
    free = h.stats().pages_free
    fail_first_run(h, monkeypatch)

    rid = h.submit(prompts[0], greedy(6))
    outs = list(h.outputs(rid, timeout=DEADLINE_S))
    assert_stream(outs, "error")
    assert tokens(outs) == []
    assert outs[-1].error is not None and "injected failure" in outs[-1].error
    wait_for(lambda: h.stats().pages_free == free, "the failed request's pages to come back")
    assert h.stats().running == 0 and not h.engine.requests

    assert h.generate(prompts[1], greedy(6)) == expected[1]
    assert h.generate(prompts[0], greedy(6)) == expected[0]
    wait_for(lambda: h.stats().pages_free == free, "the pages to come back")
