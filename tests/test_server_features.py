"""Tool calls, JSON output and the reasoning split through `hetero serve` on tiny random models.
Random weights never emit a tool call or JSON on their own; the grammar (xgrammar) is what makes
them, so these tests fail if constrained decoding or the parsing around it breaks."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from hetero.server.templates import THINK_TEMPLATE
from hetero.testing import write_tiny_v3
from hetero.testing.server import ServerProcess

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def start(tmp: Path, template: str | None = None) -> ServerProcess:
    model = write_tiny_v3(tmp / "model")
    if template is not None:
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(
            json.dumps(config | {"chat_template": template})
        )
    srv = ServerProcess(["--model", str(model), "--served-model-name", "tiny"], tmp / "serve.log")
    srv.start()
    return srv


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = start(tmp_path_factory.mktemp("tools"))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    srv.stop()


def valid_args(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return isinstance(args["city"], str) and args["unit"] in ("C", "F") and len(args) == 2
    return isinstance(args["a"], int) and isinstance(args["b"], int) and len(args) == 2


def test_required_tool_call_round_trip(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "add") for c in calls)
    assert all(valid_args(c.function.name, c.function.arguments) for c in calls)
    assert len({c.id for c in calls}) == len(calls) and calls[0].id.startswith("call_")
    # the call and the tool's answer go back in the next turn
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in calls),
    ]
    again = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=4)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens + 5


def test_named_tool_choice_streams_the_same_call(client):
    named = {"type": "function", "function": {"name": "add"}}
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=80, seed=3)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    assert [c.function.name for c in whole] == ["add"] * len(whole)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    first = [d for d in deltas if d.id]
    assert [d.function.name for d in first] == [c.function.name for c in whole]
    for i, call in enumerate(whole):
        streamed = "".join(d.function.arguments or "" for d in deltas if d.index == i)
        assert json.loads(streamed) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_auto_and_none_tool_choice_never_fail(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=16
        )
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_json_object_and_json_schema(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=200, response_format={"type": "json_object"},
        temperature=1.0, seed=5,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # (a random model may run out of tokens first)
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = TOOLS[0]["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=120, response_format=fmt, seed=seed
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        assert valid_args("get_weather", r.choices[0].message.content)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ASK, response_format=bad)


def test_reasoning_goes_to_reasoning_content(tmp_path):
    """A template that opens <think>: a random model never closes it, so its whole text is
    reasoning (content empty), streamed or not; with the split off it is all content."""
    srv = start(tmp_path, THINK_TEMPLATE)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model="tiny", messages=ASK, max_tokens=12, temperature=0)
        message = client.chat.completions.create(**kw).choices[0].message
        thought = message.model_extra["reasoning_content"]
        assert thought and not message.content
        chunks = list(client.chat.completions.create(**kw, stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                           for c in chunks if c.choices)  # fmt: skip
        assert streamed == thought
        whole = client.chat.completions.create(**kw, extra_body={"separate_reasoning": False})
        assert thought in whole.choices[0].message.content
        assert "reasoning_content" not in (whole.choices[0].message.model_extra or {})
    finally:
        srv.stop()
