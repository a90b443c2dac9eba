"""EngineHandle: the engine's step loop in its own thread, fed and read from other threads and
from asyncio, on the shipped demo model. Greedy outputs are checked against hetero.generate.

Nothing here waits on a timer to decide a result: state is polled until it holds or a generous
deadline passes, and where a test needs the loop at a known point it gates `engine.step`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.engine.engine import Engine, RequestError, ServingConfig
from hetero.engine.handle import EngineHandle
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.generate import SamplingParams as GenerateParams
from hetero.generate import generate
from hetero.loader import load_model

DEMO = demo_dir()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")
EOS = 1
DEADLINE_S = 120.0  # generous: a slow, shared CPU

SOURCE = '''def read_config(path, defaults=None):
    """Return the settings in the file at path, over the defaults."""
    settings = dict(defaults or {})
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


@dataclass
class Demo:
    model: torch.nn.Module
    tok: object
    ids: list[int]
    done: dict = field(default_factory=dict)

    def reference(self, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
        """hetero.generate's greedy tokens for each prompt (never stopping early). Call it
        before a handle runs: the model is not meant to run in two threads at once."""
        todo = [p for p in dict.fromkeys(map(tuple, prompts)) if (p, max_tokens) not in self.done]
        if todo:
            outs = generate(self.model, [list(p) for p in todo], GenerateParams(max_tokens))
            self.done.update({(p, max_tokens): out for p, out in zip(todo, outs)})
        return [self.done[tuple(p), max_tokens] for p in prompts]


@pytest.fixture(scope="module")
def demo() -> Demo:
    model = load_model(DEMO, dtype=torch.float32, progress=False)
    tok = AutoTokenizer.from_pretrained(DEMO)
    return Demo(model, tok, tok.encode(SOURCE, add_special_tokens=False))


@pytest.fixture
def make_handle(demo):
    handles = []

    def make(**config) -> EngineHandle:
        engine = Engine(demo.model, demo.tok, ServingConfig(**config), eos_ids=(EOS,))
        handles.append(EngineHandle(engine, idle_s=0.01))
        return handles[-1]

    yield make
    for h in handles:
        h.close()


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for t in out.token_ids]


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def assert_stream(outs: list[RequestOutput], finish_reason: str) -> None:
    assert outs and outs[-1].finish_reason == finish_reason
    assert all(o.finish_reason is None for o in outs[:-1])


class StepGate:
    """Holds the engine loop before each step until `advance` lets steps through."""

    def __init__(self, handle: EngineHandle, monkeypatch) -> None:
        self.handle, self.permits, self.let = handle, threading.Semaphore(0), 0
        step = handle.engine.step

        def gated():
            assert self.permits.acquire(timeout=DEADLINE_S), "the test never let a step through"
            return step()

        monkeypatch.setattr(handle.engine, "step", gated)

    def advance(self, n: int = 1) -> None:
        """Lets n more steps run and waits until they have."""
        self.let += n
        self.permits.release(n)
        wait_for(lambda: self.handle.stats().steps == self.let, f"step {self.let}")


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
