"""`hetero serve` under load, on the demo model: concurrent streams equal to each alone, a long
prompt that does not stall running streams (chunked prefill), cancelled streams and timed-out
clients giving their pages back, and SIGTERM letting requests in flight finish."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from hetero.demo import demo_dir
from hetero.session import load_tokenizer
from hetero.testing.server import ServerProcess

DEMO = demo_dir()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")
CHUNK = 128  # --max-num-batched-tokens: a long prompt takes several steps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-num-batched-tokens", str(CHUNK), "--max-queued-requests", "48"]
    with ServerProcess(args, log) as srv:
        yield srv


async def stream(
    client: httpx.AsyncClient, body: dict, times: list[float] | None = None
) -> tuple[str, list[float], list[str]]:
    """(text, arrival time of each content chunk, raw data lines) of one streamed completion;
    the times go into `times` as they come when it is given."""
    text, times, lines = "", [] if times is None else times, []
    async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line[6:])
            if line[6:] != "[DONE]":
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece:
                    text += piece
                    times.append(time.perf_counter())
    return text, times, lines


def prompts(n: int) -> list[str]:
    words = ["def", "class", "import", "return", "for", "while", "with", "lambda"]
    return [f"{words[i % 8]} item_{i}(x{i % 5}):\n" for i in range(n)]


def test_32_concurrent_streams_return_what_each_returns_alone(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            bodies = [{"prompt": p, "max_tokens": 5, "temperature": 0} for p in prompts(32)]
            together = await asyncio.gather(*(stream(client, b) for b in bodies))
            alone = [await stream(client, b) for b in bodies]
            return together, alone

    together, alone = asyncio.run(main())
    for (text, _, lines), (want, _, _) in zip(together, alone):
        assert lines[-1] == "[DONE]"
        assert text == want


def test_a_long_prompt_does_not_stall_running_streams(server):
    """Eight streams run; a prompt of ~7 chunks arrives. While it prefills, each stream keeps
    getting tokens: one step a chunk, each step also decoding the eight. Unchunked, the prompt
    would take one step and the streams would get at most one token in its window. The count is
    held to half the chunks: the client's arrival times lag the engine by a loaded machine's
    scheduling (CI has two cores for the server, the engine and this client)."""
    long = "x = [" + ", ".join(str(i) for i in range(1000, 1200)) + "]\n"  # (unseen by the cache)
    n_prompt = len(load_tokenizer(DEMO)(long)["input_ids"])
    chunks = -(-n_prompt // (CHUNK - 8))  # the budget less the eight decode tokens

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            bodies = [{"prompt": p, "max_tokens": 80, "temperature": 0} for p in prompts(8)]
            live = [[] for _ in bodies]
            running = [asyncio.create_task(stream(client, b, t)) for b, t in zip(bodies, live)]
            while not all(live):  # every stream decoding
                await asyncio.sleep(0.01)
            arrive = time.perf_counter()
            _, long_times, _ = await stream(client, {"prompt": long, "max_tokens": 2})
            return arrive, long_times[0], await asyncio.gather(*running)

    arrive, first, results = asyncio.run(main())
    assert chunks >= 5  # the prompt does go in chunks
    for _, times, _ in results:
        got = sum(arrive < t < first for t in times)
        assert got >= min(chunks // 2, len(times) - 1), (got, chunks)


def test_cancelled_streams_and_timed_out_clients_give_pages_back(server):
    async def cancel_mid_stream():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"prompt": prompts(1)[0], "max_tokens": 400, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # the first chunk: hang up while it runs
            used = server.metric("hetero:kv_pages_used")
            return used

    async def impatient(i: int):
        async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as client:
            body = {"prompt": prompts(200)[i], "max_tokens": 200, "stream": i % 2 == 0}
            try:
                await client.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                pass

    asyncio.run(cancel_mid_stream())

    async def storm():
        for start in range(0, 200, 50):
            await asyncio.gather(*(impatient(i) for i in range(start, start + 50)))

    asyncio.run(storm())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.metric("hetero:kv_pages_used") == 0 and \
                server.metric("hetero:num_requests_running") == 0:  # fmt: skip
            break
        time.sleep(0.2)
    assert server.metric("hetero:kv_pages_used") == 0
    assert server.metric("hetero:num_requests_waiting") == 0
    assert server.get("/health")[0] == 200
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "x = ", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    srv = ServerProcess([], tmp_path / "serve.log")
    srv.start()

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in prompts(2)]
            tasks = [asyncio.create_task(stream(client, b)) for b in bodies]
            await asyncio.sleep(1.0)  # streams have started
            srv.proc.send_signal(15)
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
    finally:
        code = srv.stop()
    for _, _, lines in results:
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    assert code == 0, srv.log()


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    """One request runs, one waits (--max-num-seqs 1, --max-queued-requests 1): more get 503."""
    args = ["--max-num-seqs", "1", "--max-queued-requests", "1"]
    with ServerProcess(args, tmp_path / "serve.log") as srv:

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                long = {"prompt": "def f(x):\n", "max_tokens": 1500, "ignore_eos": True}
                running = asyncio.create_task(stream(client, long))
                while srv.metric("hetero:num_requests_running") < 1:
                    await asyncio.sleep(0.05)
                short = {"prompt": "x = ", "max_tokens": 4}
                second = asyncio.create_task(client.post("/v1/completions", json=short))
                deadline = time.monotonic() + 60
                while srv.metric("hetero:num_requests_waiting") < 1:
                    assert time.monotonic() < deadline, "the second request never waited"
                    await asyncio.sleep(0.05)
                third = await client.post("/v1/completions", json=short)
                running.cancel()  # the client leaves: the running request is aborted
                return third, await second

        third, second = asyncio.run(main())
    assert second.status_code == 200
    assert third.status_code == 503 and third.headers["retry-after"].isdigit()
    assert third.json()["error"]["code"] == "queue_full"
