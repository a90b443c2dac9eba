"""Load on a running `hetero serve` (or any OpenAI-compatible server) through the official `openai`
client: closed-loop clients at each concurrency, a mix of single prompts and multi-turn chats
whose later turns resend the earlier ones (the prefix cache's work), streamed.

    hetero serve --model DIR &
    python bench/serve.py --url http://127.0.0.1:8000 --concurrency 1,4,16,64

One JSON line per concurrency level: requests and output tokens a second, TTFT, inter-token
latency (ITL: between streamed chunks that carry text) and end-to-end percentiles in ms as the
client sees them, errors, and (from the server's /metrics, when it exports hetero's counters)
the prefix-hit share of the level's prompt tokens. bench/serving_http.py measures the HTTP
layer's own cost against the engine in one process; this is what a client of a server sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving_load import Timing, parse_dist, percentiles  # noqa: E402

WORDS = ("data", "value", "list", "index", "result", "token", "model", "cache", "page", "step",
         "queue", "thread", "buffer", "layer", "expert", "stream", "batch", "prefix", "kernel",
         "weight")  # fmt: skip
QUESTIONS = ("Explain this.", "What does it return?", "Make it faster.", "Add a test for it.")


@dataclass
class Conversation:
    """A chat: its messages so far and the user turns still to send."""

    messages: list[dict]
    turns_left: int


@dataclass
class Result(Timing):
    """A request's arrival stamps of the chunks that carry text, and its error if it failed."""

    error: str | None = None


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def workload(args, rng: random.Random) -> list[Conversation]:
    """`requests` first turns: a share `--chat-share` of them chats of `--turns` turns."""
    lens = parse_dist(args.prompt_len).draw(args.np_rng, args.requests)
    convs = []
    for n in lens:
        turns = args.turns if rng.random() < args.chat_share else 1
        system = {"role": "system", "content": "You are a careful programmer."}
        user = {"role": "user", "content": random_text(rng, max(1, int(n)))}
        convs.append(Conversation([system, user], turns - 1))
    return convs


async def one_request(client, args, messages: list[dict], max_tokens: int) -> tuple[Result, str]:
    r, text = Result(time.perf_counter()), []
    try:
        stream = await client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=max_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                r.stamps.append(time.perf_counter())
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                r.tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as e:
        r.error = f"{type(e).__name__}: {e}"[:200]
    return r, "".join(text)


async def run_level(client, args, convs: list[Conversation], concurrency: int) -> list[Result]:
    """Closed loop: each client takes the next conversation and plays all its turns."""
    outputs = parse_dist(args.output_len).draw(args.np_rng, sum(1 + c.turns_left for c in convs))
    budget, queue, results = iter(outputs), iter(convs), []
    rng = random.Random(args.seed + concurrency)

    async def client_loop() -> None:
        for conv in queue:
            while True:
                r, reply = await one_request(client, args, conv.messages, int(next(budget)))
                results.append(r)
                if r.error or conv.turns_left == 0:
                    break
                conv.messages += [{"role": "assistant", "content": reply},
                                  {"role": "user", "content": rng.choice(QUESTIONS)}]  # fmt: skip
                conv.turns_left -= 1

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def prefix_counters(url: str, api_key: str | None) -> tuple[float, float] | None:
    """(prompt tokens, prefix-cache hit tokens) from hetero's /metrics; None elsewhere."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url.rstrip("/") + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError):  # (urllib's errors are OSErrors)
        return None
    values = {}
    for name in ("prompt_tokens", "prefix_cache_hit_tokens"):
        m = re.search(rf"^hetero:{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        if m is None:
            return None
        values[name] = float(m.group(1))
    return values["prompt_tokens"], values["prefix_cache_hit_tokens"]


def summary(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.stamps]
    gaps = [b - a for r in ok for a, b in zip(r.stamps, r.stamps[1:])]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "output_tokens": tokens, "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2), "req_s": round(len(ok) / wall, 3),
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "itl_ms": percentiles(gaps),
        "e2e_ms": percentiles([r.e2e for r in ok]),
    }  # fmt: skip


async def main_async(args) -> None:
    import numpy as np

    client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1",
                                api_key=args.api_key or "unused", max_retries=0,
                                timeout=args.timeout)  # fmt: skip
    if args.model is None:
        args.model = (await client.models.list()).data[0].id
    args.np_rng = np.random.default_rng(args.seed)
    for concurrency in args.concurrency:
        n = args.requests if args.requests > 0 else -args.requests * concurrency
        convs = workload(argparse.Namespace(**{**vars(args), "requests": n}),
                         random.Random(args.seed + concurrency))  # fmt: skip
        before = prefix_counters(args.url, args.api_key)
        t0 = time.perf_counter()
        results = await run_level(client, args, convs, concurrency)
        row = {"bench": "serve", "url": args.url, "model": args.model,
               "concurrency": concurrency, "conversations": n, "turns": args.turns,
               "chat_share": args.chat_share, "prompt_len": args.prompt_len,
               "output_len": args.output_len,
               **summary(results, time.perf_counter() - t0)}  # fmt: skip
        after = prefix_counters(args.url, args.api_key)
        if before and after and after[0] > before[0]:
            row["prefix_hit_share"] = round((after[1] - before[1]) / (after[0] - before[0]), 4)
        print(json.dumps(row), flush=True)
    await client.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", help="the server's --api-key, if it has one")
    p.add_argument("--model", help="default: the server's first model")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                   default=[1, 4, 16, 64])  # fmt: skip
    p.add_argument(
        "--requests",
        type=lambda s: -int(s[:-1]) if s.endswith("x") else int(s),
        default=-2,
        help="conversations a level: N, or Kx (K x the concurrency)",
    )
    p.add_argument("--prompt-len", default="uniform:16,256", help="words of a first turn")
    p.add_argument("--output-len", default="fixed:64", help="max_tokens of each reply")
    p.add_argument("--chat-share", type=float, default=0.5, help="conversations of --turns")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for spec in (args.prompt_len, args.output_len):
        try:
            parse_dist(spec)
        except ValueError as e:
            p.error(str(e))
    if args.requests == 0 or args.turns < 1 or not 0 <= args.chat_share <= 1:
        p.error("--requests must be non-zero, --turns >= 1, --chat-share within 0..1")
    return args


def main(argv=None) -> None:
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    main()
