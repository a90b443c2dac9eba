"""`hetero serve` on the shipped demo model, as a subprocess on 127.0.0.1, driven with the official
`openai` client: chat and completions, streaming and not, n, stop, max_tokens, seeds, usage,
logprobs against the engine's own, prefix reuse between chat turns, errors in OpenAI's shape."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.testing.server import ServerProcess

DEMO = demo_dir()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")
PROMPT = "def read_lines(path):\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with ServerProcess(["--max-queued-requests", "64"], log) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def prompt_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert server.get("/health") == (200, '{"status":"ok"}')


def test_chat_stream_equals_non_stream_and_usage_is_the_tokenizers(client, tok):
    messages = chat("Write a function that reads a file.")
    full = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=24, temperature=0
    )
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(prompt_ids(tok, messages))
    assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # the answer's tokens are what the text says: 24 of them, re-encoded the same
    assert len(tok.encode(text, add_special_tokens=False)) <= 24


def test_completions_with_n_stop_echo_and_token_prompts(client, tok):
    ids = tok.encode(PROMPT)
    by_text = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    echo = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=12, temperature=0, echo=True
    )
    assert echo.choices[0].text == PROMPT + by_text.choices[0].text
    # a stop string taken from the greedy text: the answer ends right before it, reason stop
    text = by_text.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    many = client.completions.create(
        model="demo", prompt=[PROMPT, "class Stack:\n"], max_tokens=6, n=3, temperature=1, seed=7
    )
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert many.usage.completion_tokens == 6 * 6


def test_seeds_reproduce_and_choices_differ(client):
    def run():
        r = client.chat.completions.create(
            model="demo", messages=chat("Hello"), max_tokens=16, temperature=1.0, seed=1234, n=3
        )
        return [c.message.content for c in r.choices]

    first = run()
    assert run() == first
    assert len(set(first)) > 1  # each choice draws with its own seed


def test_logprobs_are_the_engines(client, tok):
    """The server's logprobs against the demo model's own log_softmax over the same tokens."""
    from hetero.loader import load_model
    from hetero.model import ForwardBatch

    messages = chat("Sort a list.")
    r = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    prompt = prompt_ids(tok, messages)
    out = tok.encode(r.choices[0].message.content, add_special_tokens=False)
    model = load_model(DEMO, device="cpu", dtype=torch.float32, progress=False)
    ids = prompt + out[:5]
    cache = model.new_cache(1, len(ids))
    batch = ForwardBatch.build([0], [len(ids)], [len(ids)])
    with torch.inference_mode():
        logp = model(torch.tensor(ids), batch, cache).float().log_softmax(-1)  # [T, V]
    for i, c in enumerate(content[:5]):
        want = logp[len(prompt) - 1 + i]
        assert math.isclose(c.logprob, want.max().item(), abs_tol=1e-3)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)


def test_a_second_chat_turn_reuses_the_first(server, client):
    """The second turn's prompt starts with the first's: its full pages come from the cache."""
    long = "Explain this code:\n" + "def f(x):\n    return x * 2\n" * 40
    messages = chat(long)
    first = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    hits = server.metric("hetero:prefix_cache_hit_tokens_total")
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And now in one line?"},
    ]
    second = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    reused = server.metric("hetero:prefix_cache_hit_tokens_total") - hits
    assert reused >= first.usage.prompt_tokens - 64  # all but the last, partial page
    assert second.usage.prompt_tokens_details.cached_tokens == reused


def test_errors_are_openai_shaped(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=chat("hi"))
    assert "gpt-4" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:  # over the context: numbers named
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=100000)
    assert "100000" in e.value.message and "2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # a stream is refused before its 200
        client.chat.completions.create(
            model="demo", messages=chat("hi"), max_tokens=100000, stream=True
        )
    call = {"function": {"name": "", "arguments": ""}}  # (found by the fuzz test)
    nameless_call = {"role": "assistant", "content": None, "tool_calls": [call]}
    cases = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "role"),
        (json.dumps({"messages": chat("x"), "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({"messages": chat("x"), "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"messages": "hello"}).encode(), "messages"),
        (json.dumps({"messages": [nameless_call]}).encode(), "function name"),  # (was a 500)
    ]
    for body, named in cases:
        r = httpx.post(server.url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert named in error["message"] and error["type"] == "invalid_request_error", error
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    big = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20))
    assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]


def test_the_chat_page_is_served(server):
    status, page = server.get("/")
    assert status == 200 and "<html" in page.lower()
    assert server.get("/static/app.js")[0] == 200
    assert server.get("/static/..%2Fapp.py")[0] == 404


def test_terminal_chat_talks_to_the_server(server):
    """`hetero chat --url`: two turns streamed from the server."""
    import io

    from hetero.chat import remote_chat_loop
    from hetero.engine.params import SamplingParams

    lines = iter(["def add(a, b):", "And subtract?"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    params = SamplingParams(max_tokens=8, temperature=0)
    assert remote_chat_loop(server.url, params, read=read, out=out) == 2
    replies = [line for line in out.getvalue().splitlines() if line.startswith("hetero> ")]
    assert len(replies) == 2 and all(len(r) > len("hetero> ") for r in replies)
