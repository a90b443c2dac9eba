"""What the server knows: its frozen settings, and the engine once it is loaded.

The app answers while the model loads (/health says 503 until then) and while it drains after
SIGTERM, so the engine is set on the state later, by the loader, not passed to `create_app`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hetero.engine.engine import RequestError
from hetero.engine.handle import EngineHandle
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.server.errors import APIError


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "hetero"
    api_key: str | None = None  # required as `Authorization: Bearer` on /v1 when set
    max_queued_requests: int = 256  # requests waiting for the engine beyond which 503 answers
    max_body_bytes: int = 4 << 20
    reasoning: bool = True  # split <think> text into reasoning_content where the model thinks
    retry_after_s: int = 2  # what a 503 asks the client to wait


@dataclass
class Loaded:
    """The engine and what the routes need with it."""

    handle: EngineHandle
    tokenizer: object
    context: int  # the model's context in tokens (prompt + output)
    close: object = None  # stops the CPU expert engine


@dataclass
class ServerState:
    config: ServerConfig
    loaded: Loaded | None = None
    load_error: str | None = None
    draining: bool = False

    def engine(self) -> Loaded:
        """The loaded engine, or the 503 a request gets while there is none."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers=retry)
        if self.loaded is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else None
            raise APIError(503, why or "the model is still loading", code="loading", headers=retry)
        return self.loaded

    def check_model(self, name: str | None) -> None:
        if name and name != self.config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )


async def prepare_all(state: ServerState, params: list[SamplingParams]) -> None:
    """The requests' grammars compiled in a worker thread (EngineHandle.prepare), off the event
    loop, which meanwhile keeps the other streams flowing; `submit_all` then finds them cached."""
    loaded = state.engine()
    for p in {p.grammar: p for p in params if p.grammar is not None}.values():
        await asyncio.to_thread(loaded.handle.prepare, p)


def submit_all(
    state: ServerState, prompts: list[list[int]], params: list[SamplingParams]
) -> list[str]:
    """Queues one engine request per (prompt, params): all or none (a 400 naming the numbers
    for a request the engine can never serve, a 503 while the queue is full)."""
    loaded = state.engine()
    stats = loaded.handle.stats()
    if stats.waiting + len(prompts) > state.config.max_queued_requests:
        raise APIError(
            503,
            f"{stats.waiting} requests are waiting (at most {state.config.max_queued_requests})",
            code="queue_full",
            headers={"Retry-After": str(state.config.retry_after_s)},
        )
    loop = asyncio.get_running_loop()
    ids: list[str] = []
    try:
        for prompt, p in zip(prompts, params):
            ids.append(loaded.handle.submit(prompt, p, loop=loop))
    except RequestError as e:
        for rid in ids:
            loaded.handle.release(rid)
        param = "max_tokens" if "max_tokens" in str(e) else None
        raise APIError(400, str(e), param=param) from None
    return ids


async def merged(
    state: ServerState, ids: list[str], abandoned=None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of every request as it comes. Leaving early (the client went
    away, the stream was cancelled) releases the requests still running: their pages return,
    and `abandoned(n)` is told how many there were."""
    handle = state.engine().handle
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, rid: str) -> None:
        async for out in handle.stream(rid):
            await queue.put((i, out))

    tasks = [asyncio.create_task(pump(i, rid)) for i, rid in enumerate(ids)]
    left = len(ids)
    try:
        while left:
            i, out = await queue.get()
            left -= out.finished
            yield i, out
    finally:
        if left and abandoned is not None:
            abandoned(left)
        for task in tasks:
            task.cancel()
        for rid in ids:  # finished ones are ignored by the engine
            handle.release(rid)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
