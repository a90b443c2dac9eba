"""The thread-safe face of the engine: its step loop runs in a thread of its own, callers submit
requests and read each one's outputs as a stream (sync or async), abort them, and read stats.

`submit` checks a request at once (RequestError naming the numbers) and hands it to the loop
through an inbox; the loop adds and aborts between steps, so no caller ever waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from hetero.engine.engine import Engine
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.engine.request import Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    pages_used: int
    pages_free: int
    pages_total: int
    page_size: int
    prompt_tokens: int  # of admitted requests
    prefix_hit_tokens: int  # of those, found in the prefix cache
    generated_tokens: int
    preemptions: int
    steps: int
    # seconds the CPU expert engine has computed so far (None without one): a counter, so any
    # number of readers take their own busy share as its rate
    cpu_busy_s: float | None


def failed(rid: str, prompt_tokens: int, error: Exception) -> RequestOutput:
    return RequestOutput(rid, (), "", None, "error", Usage(prompt_tokens, 0, 0), error=str(error))


class _Sink:
    """Where one request's outputs go: a thread queue, or an asyncio queue of the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.queue: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue()
        )

    def put(self, out: RequestOutput) -> None:
        if self.loop is None:
            self.queue.put(out)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)


class EngineHandle:
    def __init__(self, engine: Engine, cpu_engine=None, idle_s: float = 0.05) -> None:
        """`cpu_engine`: the CPU expert engine (CPUExperts) whose busy share stats reports."""
        self.engine, self.cpu_engine, self.idle_s = engine, cpu_engine, idle_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()  # guards _sinks and the counters below
        self._steps = self._generated = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetero-engine", daemon=True)
        self._thread.start()

    # -- callers (any thread) --------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> str:
        """Queues a request; -> its id. Its outputs are read with `outputs(id)`, or, when
        `loop` is given (the caller's asyncio loop), with `async for out in stream(id)`."""
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        self.engine.check(prompt_ids, params)
        rid = request_id or f"req-{uuid.uuid4().hex}"
        with self._lock:
            if rid in self._sinks:
                raise ValueError(f"request id {rid!r} is already in use")
            self._sinks[rid] = _Sink(loop)
        self._inbox.put(("add", rid, list(prompt_ids), params))
        self._wake.set()
        return rid

    def prepare(self, params: SamplingParams) -> None:
        """The slow part of `submit`'s checks ahead of it: compiling the request's grammar
        (xgrammar takes ~0.1-1 s for a JSON schema against a large vocabulary), so that an
        asyncio caller can run it in a worker thread and keep its event loop streaming. The
        result is cached; errors are left to `submit`, which reports them."""
        if params.grammar is not None:
            try:
                self.engine.grammars.compile(params.grammar)
            except ValueError:
                pass

    def abort(self, request_id: str) -> None:
        """Ends the request (its stream gets a last output, finish_reason "abort") and frees
        its pages; unknown or finished ids are ignored."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def release(self, request_id: str) -> None:
        """Abort for a caller that will read no more (a client gone): its outputs are dropped
        instead of kept for a reader."""
        self.abort(request_id)
        self._forget(request_id)

    def outputs(self, request_id: str, timeout: float | None = None) -> Iterator[RequestOutput]:
        """The request's outputs, its last one finished; all of them, however late the call."""
        sink = self._sink(request_id)

        def read() -> Iterator[RequestOutput]:
            while True:
                out = sink.queue.get(timeout=timeout)
                yield out
                if out.finished:
                    self._forget(request_id)
                    return

        return read()

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """`async for` over the outputs of a request submitted with `loop`."""
        sink = self._sink(request_id)

        async def read() -> AsyncIterator[RequestOutput]:
            while True:
                out = await sink.queue.get()
                yield out
                if out.finished:
                    self._forget(request_id)
                    return

        return read()

    def _sink(self, request_id: str) -> _Sink:
        with self._lock:
            if request_id not in self._sinks:
                raise KeyError(f"unknown request id {request_id!r} (or its outputs were read)")
            return self._sinks[request_id]

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The output token ids of one request, waiting for it (a convenience for scripts)."""
        rid = self.submit(prompt_ids, params)
        return [t for out in self.outputs(rid) for t in out.token_ids]

    def stats(self) -> EngineStats:
        e = self.engine
        with self._lock:
            steps, generated = self._steps, self._generated
        busy = None if self.cpu_engine is None else self.cpu_engine.stats.busy_s
        return EngineStats(
            running=len(e.scheduler.running),
            waiting=len(e.scheduler.waiting),
            pages_used=e.pool.num_used,
            pages_free=e.pool.num_free,
            pages_total=e.pool.capacity,
            page_size=e.pool.page_size,
            prompt_tokens=e.pool.stats.prompt_tokens,
            prefix_hit_tokens=e.pool.stats.hit_tokens,
            generated_tokens=generated,
            preemptions=e.scheduler.preemptions,
            steps=steps,
            cpu_busy_s=busy,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still in flight end with finish_reason "abort"."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            self._generated += sum(len(o.token_ids) for o in outputs)
            for out in outputs:  # the reader forgets the sink once it has the last output
                if (sink := self._sinks.get(out.request_id)) is not None:
                    sink.put(out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    self.engine.add_request(prompt, params, rid)
                except Exception as e:  # checked at submit: only a bug gets here
                    log.exception("request %s could not be added", rid)
                    self._deliver([failed(rid, len(prompt), e)])
            elif (out := self.engine.abort(cmd[1])) is not None:
                self._deliver([out])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_work:
                self._wake.wait(self.idle_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step ends its requests, never the engine
                log.exception("engine step failed; its running requests end with an error")
                outputs = self.engine.fail_running(f"{type(e).__name__}: {e}")
            with self._lock:
                self._steps += 1
            self._deliver(outputs)
        self._drain_inbox()  # requests submitted while the last step ran end too
        for rid in list(self.engine.requests):
            if (out := self.engine.abort(rid)) is not None:
                self._deliver([out])
