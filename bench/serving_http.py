"""The HTTP layer's cost: the same requests through `hetero serve`'s app (uvicorn on 127.0.0.1,
streamed `/v1/completions` with token-id prompts, httpx clients) and straight through the engine
handle (bench/throughput.py's offline drive), alternated level by level in one run.

    python bench/serving_http.py --workload v2-lite --concurrency 1,16 --requests 8,32 \
        --prompt-len uniform:64,256 --output-len fixed:64

One JSON line per (concurrency, path): output tok/s, requests/s, TTFT / inter-token latency /
end-to-end percentiles (ms, as the client sees them), prefix-hit share; the HTTP line carries
`vs_offline` (its tok/s over the offline one's). Options are bench/throughput.py's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from bench.serving_load import Timing, drive, latency_summary, machine, percentiles  # noqa: E402
from bench.throughput import load, params, parse_args, plan, serving_config  # noqa: E402
from hetero.engine.engine import Engine  # noqa: E402
from hetero.engine.handle import EngineHandle  # noqa: E402
from hetero.server.app import create_app  # noqa: E402
from hetero.server.state import Loaded, ServerConfig, ServerState  # noqa: E402


def serve(handle: EngineHandle, tokenizer, context: int) -> tuple[uvicorn.Server, str]:
    """The server's app on the handle, in a thread; -> (server, base url)."""
    state = ServerState(ServerConfig(model_name="bench", max_queued_requests=10**6))
    state.loaded = Loaded(handle, tokenizer, context)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


async def _http_drive(url: str, reqs, concurrency: int) -> tuple[list[Timing], list[float]]:
    order, timings, gaps = iter(range(len(reqs))), [None] * len(reqs), []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one_client() -> None:
            for i in order:
                t = timings[i] = Timing(time.perf_counter())
                # logprobs: every token gets its chunk (a token whose text is held back, or
                # empty as the random models' stub tokenizer makes it, would otherwise send none)
                body = {"prompt": reqs[i].prompt, "max_tokens": reqs[i].output, "stream": True,
                        "temperature": 0, "ignore_eos": True, "logprobs": 0}  # fmt: skip
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        if n := len((choice["logprobs"] or {}).get("tokens", ())):
                            now = time.perf_counter()
                            if t.stamps:
                                gaps.append(now - t.stamps[-1])
                            t.stamps.append(now)
                            t.tokens += n

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return timings, gaps


def http_drive(url: str, reqs, concurrency: int):
    t0 = time.perf_counter()
    timings, gaps = asyncio.run(_http_drive(url, reqs, concurrency))
    return timings, gaps, time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    model, cpu, tokenizer, close, facts = load(args)
    engine = Engine(model, tokenizer, serving_config(args))
    handle = EngineHandle(engine, cpu)
    server, url = serve(handle, tokenizer, engine.max_model_len)
    base = {"bench": "serving_http", "workload": args.workload, **facts,
            "machine": machine(args.device)}  # fmt: skip
    levels, warm = plan(args, model.config.vocab_size)
    try:
        if warm:
            drive(handle, warm, params, min(len(warm), max(args.concurrency)))
            http_drive(url, warm[:2], 2)
        for C, reqs in levels:
            rows = {}
            for path in ("offline", "http", "offline", "http"):  # alternated: VMs drift
                s0 = handle.stats()
                if path == "http":
                    timings, gaps, wall = http_drive(url, reqs, C)
                else:
                    timings, wall = drive(handle, reqs, params, C)
                    gaps = [b - a for t in timings for a, b in zip(t.stamps, t.stamps[1:])]
                s1 = handle.stats()
                hits = s1.prefix_hit_tokens - s0.prefix_hit_tokens
                prompt = max(s1.prompt_tokens - s0.prompt_tokens, 1)
                row = {**base, "path": path, "concurrency": C, "requests": len(reqs),
                       **latency_summary(timings, wall), "itl_ms": percentiles(gaps),
                       "prefix_hit_share": round(hits / prompt, 4)}  # fmt: skip
                if path == "http" and "offline" in rows:
                    row["vs_offline"] = round(row["output_tok_s"] / rows["offline"], 3)
                rows[path] = row["output_tok_s"]
                print(json.dumps(row), flush=True)
    finally:
        server.should_exit = True
        handle.close()
        close()


if __name__ == "__main__":
    main()
