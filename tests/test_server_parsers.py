"""The server's text-level pieces: tool-call parsing (whole and streamed), the reasoning split
(whole and streamed), and chat templates with tools and reasoning on fixture tokenizers."""

from __future__ import annotations

import json
import random
import re

import pytest

from hetero.server import templates
from hetero.server.reasoning import ReasoningStream, split_reasoning
from hetero.server.toolcalls import (
    ARGS_OPEN,
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    EOS,
    OUTPUT_BEGIN,
    OUTPUT_END,
    OUTPUTS_BEGIN,
    OUTPUTS_END,
    SEP,
    TOKENS,
    CallDelta,
    ContentDelta,
    ToolCallStream,
    chat_messages_for_template,
    format_call,
    parse_tool_calls,
    render_tools_system,
)
from hetero.testing.tokenizer import (
    ASSISTANT,
    BOS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    USER,
    save_tokenizer,
    train_tokenizer,
)

ID = re.compile(r"call_[0-9a-f]{24}")
ARGS = '{"city": "Paris", "days": [1, {"unit": null}]}'
# Arguments that hold what the stream must not mistake for their end: "<", backticks, "｜",
# a no-break space and a newline escape.
TRICKY = '{"code": "a < b ``` <｜ `x`", "s": "\\u00a0\u00a0 \\n```"}'


def calls_text(*calls: tuple[str, str], sep: str = "\n") -> str:
    return CALLS_BEGIN + sep.join(format_call(n, a) for n, a in calls) + CALLS_END


VALID = [
    calls_text(("get_weather", ARGS)),
    "Let me check." + calls_text(("get_weather", ARGS), ("now", "{}")) + EOS,
    "a < b <｜tool" + calls_text(("run", TRICKY), ("f", ' {"x": 1} '), sep=" \n "),
    "no end: " + CALLS_BEGIN + format_call("f", ARGS) + "\n" + format_call("g", "{}"),
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + ARGS_OPEN + ARGS + "\n```" + CALLS_END,
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + ARGS_OPEN + ARGS + EOS,
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + ARGS_OPEN + ARGS + "\n```",
    calls_text(("f", "{}")) + "text after the calls is dropped",
    CALLS_BEGIN + format_call("f", "{}") + "stray text ends the calls" + CALLS_END,
    CALLS_BEGIN + format_call("f", "{}") + "\n<｜tool▁call▁beg",
]
CONTENT_ONLY = ["plain text", "", "ends with <｜tool▁calls", "a <｜tool▁call▁begin｜> b"]
# Malformed before any call is complete enough to announce: all content, streamed or not.
EARLY_BAD = [
    "x" + CALLS_BEGIN + "garbage" + CALLS_END,
    CALLS_BEGIN + CALLS_END,
    CALLS_BEGIN + CALL_BEGIN + "function f" + ARGS_OPEN + "{}" + CALL_END + CALLS_END,
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "two words" + ARGS_OPEN + "{}" + CALL_END,
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + CALL_END + ARGS_OPEN + "{}",
    CALLS_BEGIN + " \n<｜tool▁call▁beg",
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f",
]
# Arguments that are not one JSON object: all content when parsed whole.
BAD_ARGS = [
    calls_text(("f", '{"a": }')),
    "pre" + calls_text(("f", "[1, 2]")),
    calls_text(("f", "{}"), ("g", '{"a": 1')),
    CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + ARGS_OPEN + '{"a": 1',  # cut off
]


def splits(text: str, seed: int = 0) -> list[list[str]]:
    """Ways to deliver text: whole, by character, in two at every point, in random chunks, and
    at the format's token boundaries (as a detokenizer delivers them)."""
    rng = random.Random(seed)
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    marks = "(" + "|".join(map(re.escape, (*TOKENS, EOS))) + ")"
    out.append([p for p in re.split(marks, text) if p])
    return out


def stream(chunks: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) from ToolCallStream's events, checking their shape."""
    s = ToolCallStream()
    events = [e for c in chunks for e in s.push(c)] + s.finish()
    content, calls = "", []
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content += e.text
        elif e.id is not None:
            assert ID.fullmatch(e.id) and e.index == len(calls) and e.arguments == ""
            assert e.to_openai() == {"index": e.index, "id": e.id, "type": "function",
                                     "function": {"name": e.name, "arguments": ""}}  # fmt: skip
            calls.append([e.name, ""])
        else:
            assert isinstance(e, CallDelta) and e.arguments and e.index == len(calls) - 1
            assert e.to_openai() == {"index": e.index, "function": {"arguments": e.arguments}}
            calls[-1][1] += e.arguments
    return content, [tuple(c) for c in calls]


def test_parse_one_call():
    content, calls = parse_tool_calls(calls_text(("get_weather", ARGS)) + EOS)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", ARGS)]
    assert ID.fullmatch(calls[0].id)
    assert calls[0].to_openai()["function"] == {"name": "get_weather", "arguments": ARGS}


def test_parse_two_calls_after_content():
    content, calls = parse_tool_calls(VALID[1])
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", ARGS), ("now", "{}")]
    assert calls[0].id != calls[1].id
    assert [json.loads(c.arguments) for c in calls] == [json.loads(ARGS), {}]


def test_parse_tolerates_missing_end_tokens():
    for text in VALID[3:7]:
        content, calls = parse_tool_calls(text)
        assert calls and calls[0].name == "f" and calls[0].arguments == ARGS, text
    assert parse_tool_calls(VALID[3])[0] == "no end: "
    assert [c.name for c in parse_tool_calls(VALID[3])[1]] == ["f", "g"]


def test_parse_keeps_arguments_as_generated():
    _, calls = parse_tool_calls(VALID[2])
    assert [(c.name, c.arguments) for c in calls] == [("run", TRICKY), ("f", '{"x": 1}')]


@pytest.mark.parametrize("text", CONTENT_ONLY + EARLY_BAD + BAD_ARGS)
def test_parse_malformed_is_all_content(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", VALID + CONTENT_ONLY + EARLY_BAD)
def test_stream_matches_parse_in_every_split(text):
    content, calls = parse_tool_calls(text)
    want = (content, [(c.name, c.arguments) for c in calls])
    for chunks in splits(text):
        assert stream(chunks) == want, chunks


@pytest.mark.parametrize("text", BAD_ARGS)
def test_stream_bad_arguments_lose_no_text(text):
    """Pieces already sent stay sent; the rest of the reply comes out as content."""
    for chunks in splits(text):
        content, calls = stream(chunks)
        assert calls and calls[0][0] == "f"
        # The reply from the failing call's arguments on: what was sent of them, then content.
        pre = text[: text.index(CALLS_BEGIN)]
        rest, tail = text[text.rindex(ARGS_OPEN) + len(ARGS_OPEN) :], content[len(pre) :]
        assert content.startswith(pre) and rest.endswith(tail)
        assert rest[: len(rest) - len(tail)].lstrip() == calls[-1][1]


def fuzz_reply(rng: random.Random) -> str:
    """A reply in the call format with up to two random edits (a piece dropped, doubled or
    replaced by another), so that some still parse."""
    args = ["{}", '{"a": 1}', TRICKY, "[1]", '{"a":', " { } "]
    parts = [rng.choice(["", "Hi.", "x <"]), CALLS_BEGIN]
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice(["", "\n", " "]), CALL_BEGIN, "function", SEP, rng.choice("fg")]
        parts += [ARGS_OPEN, rng.choice(args), rng.choice(["\n```", "", "```"]), CALL_END]
    parts += [rng.choice([CALLS_END, CALLS_END + EOS, "", "x"])]
    noise = [*TOKENS, EOS, ARGS_OPEN, "```", "\n", " ", "x", "<", "<｜", "}", "a b"]
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(parts))
        parts[i] = rng.choice(["", parts[i] * 2, rng.choice(noise)])
    return "".join(parts)


def test_stream_fuzz_against_parse():
    """Whenever the whole parse finds calls or the stream announces none, every split gives
    exactly what parse_tool_calls gives."""
    rng = random.Random(1)
    parsed = compared = 0
    for _ in range(300):
        text = fuzz_reply(rng)
        content, calls = parse_tool_calls(text)
        want = (content, [(c.name, c.arguments) for c in calls])
        parsed += bool(calls)
        for chunks in [[text], list(text)] + splits(text, rng.randint(0, 99))[-4:]:
            got = stream(chunks)
            if calls or not got[1]:
                assert got == want, (text, chunks)
                compared += 1
    assert parsed > 50 and compared > 500


def test_render_tools_system():
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "now"}},
    ]  # fmt: skip
    text = render_tools_system(tools)
    assert "### get_weather\nDescription: Weather now\nParameters: {" in text
    assert "### now\nParameters: {" in text
    for token in (CALLS_BEGIN, CALL_BEGIN, SEP, ARGS_OPEN, CALL_END, CALLS_END):
        assert token in text
    with pytest.raises(ValueError, match="name"):
        render_tools_system([{"type": "function", "function": {"description": "x"}}])


def openai_call(name: str, arguments: str | dict, id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": id, **call} if id else call


def test_chat_messages_for_template():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    calls = [openai_call("f", '{"x": 1}', "call_1"), openai_call("g", {"y": [2]})]
    messages = [
        {"role": "developer", "content": parts},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "r"}]},
    ]
    out = chat_messages_for_template(messages)
    assert out[0] == {"role": "system", "content": "a\nb"}
    assert out[2]["content"] is None
    assert [c["function"] for c in out[2]["tool_calls"]] == [
        {"name": "f", "arguments": '{"x": 1}'},
        {"name": "g", "arguments": '{"y": [2]}'},
    ]
    assert out[3] == {"role": "tool", "content": "r", "tool_call_id": "call_1"}
    assert chat_messages_for_template(out) == out
    with pytest.raises(ValueError):
        chat_messages_for_template([{"role": "user", "content": [{"type": "image_url"}]}])


REASONING = [
    ("<think>\nI add.\n2+2=4\n</think>\n\nIt is 4.", False, ("I add.\n2+2=4", "It is 4.")),
    ("I add.\n</think>\n\nIt is 4.\n", True, ("I add.", "It is 4.\n")),
    ("\n\nstill thinking\n", True, ("still thinking\n", "")),
    ("\n</think>\n\n", True, ("", "")),
    ("Hello\n\nthere", False, (None, "Hello\n\nthere")),
    ("Hello</think>x", False, (None, "Hello</think>x")),
    ("<thin", False, (None, "<thin")),
    ("<think", True, ("<think", "")),
    ("a\n</thin", True, ("a\n</thin", "")),
    ("<think>a</think>b</think>c", False, ("a", "b</think>c")),
    ("", True, ("", "")),
]


@pytest.mark.parametrize("text,starts,want", REASONING)
def test_split_reasoning(text, starts, want):
    assert split_reasoning(text, starts) == want


@pytest.mark.parametrize("text,starts,want", REASONING)
def test_reasoning_stream_in_every_split(text, starts, want):
    for chunks in splits(text):
        s = ReasoningStream(starts)
        pieces = [p for c in chunks for p in s.push(c)] + s.finish()
        assert all(t and k in ("reasoning", "content") for k, t in pieces)
        got = tuple("".join(t for k, t in pieces if k == kind) for kind in ("reasoning", "content"))
        assert got == (want[0] or "", want[1]), chunks


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """The fixture tokenizer with V3's template (no tools), THINK_TEMPLATE and TOOL_TEMPLATE."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(1024)
    out = {}
    for name, template in [("plain", None), ("think", templates.THINK_TEMPLATE),
                           ("tool", templates.TOOL_TEMPLATE)]:  # fmt: skip
        path = tmp_path_factory.mktemp(name)
        save_tokenizer(tok, path, 512, *([template] if template else []))
        out[name] = transformers.AutoTokenizer.from_pretrained(path)
    return out


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "local_time", "parameters": {"type": "object"}}},
]  # fmt: skip
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            openai_call("get_weather", ARGS, "call_a"),
            openai_call("local_time", "{}", "call_b"),
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
]


def test_fixture_special_tokens(toks):
    tok = toks["plain"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    for token in (*TOKENS, "<think>", "</think>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_needs_tool_template(toks):
    assert templates.needs_tool_template(toks["plain"])
    assert not templates.needs_tool_template(toks["think"])
    assert not templates.needs_tool_template(toks["tool"])


def test_render_chat_with_tools_round_trip(toks):
    tok = toks["plain"]
    text = templates.render_chat(tok, ROUND_TRIP, TOOLS)
    assert text.startswith(BOS + "Be brief.\n\n" + render_tools_system(TOOLS) + USER)
    for tool in TOOLS:
        assert "### " + tool["function"]["name"] in text
    calls = calls_text(("get_weather", ARGS), ("local_time", "{}"))
    outputs = OUTPUT_BEGIN + "sunny" + OUTPUT_END + "\n" + OUTPUT_BEGIN + "noon" + OUTPUT_END
    # After tool outputs the assistant turn goes on: no new <｜Assistant｜>.
    assert text.endswith(ASSISTANT + calls + EOS + OUTPUTS_BEGIN + outputs + OUTPUTS_END)
    assert text.count(OUTPUTS_BEGIN) == 1
    # What the template writes for past calls is what the parser reads back.
    turn = text[text.rindex(ASSISTANT) + len(ASSISTANT) : text.index(OUTPUTS_BEGIN)]
    got = parse_tool_calls(turn)
    assert got[0] == "" and [(c.name, c.arguments) for c in got[1]] == [
        ("get_weather", ARGS),
        ("local_time", "{}"),
    ]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for token in (CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END, OUTPUTS_BEGIN, OUTPUTS_END):
        assert tok.convert_tokens_to_ids(token) in ids, token
    # The same history with the tool template as the checkpoint's own.
    assert templates.render_chat(toks["tool"], ROUND_TRIP, TOOLS) == text

    answered = [*ROUND_TRIP, {"role": "assistant", "content": "Sunny, noon."},
                {"role": "user", "content": "Thanks"}]  # fmt: skip
    more = templates.render_chat(tok, answered, TOOLS)
    assert more.endswith(OUTPUTS_END + "Sunny, noon." + EOS + USER + "Thanks" + ASSISTANT)


def test_render_chat_without_tools_uses_the_checkpoint_template(toks):
    tok = toks["plain"]
    hi = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert templates.render_chat(tok, hi) == BOS + USER + "hi" + ASSISTANT
    assert templates.render_chat(tok, hi, add_generation_prompt=False) == BOS + USER + "hi"
    assert not templates.thinks(tok)


def test_render_chat_errors_are_value_errors(toks):
    with pytest.raises(ValueError, match="role"):
        templates.render_chat(toks["plain"], [{"role": "wizard", "content": "x"}], TOOLS)
    with pytest.raises(ValueError):
        templates.render_chat(toks["plain"], [], TOOLS)


def test_think_template(toks):
    tok = toks["think"]
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = templates.render_chat(tok, chat)
    assert text.endswith("<｜Assistant｜><think>\n")
    assert (
        text
        == BOS + USER + "2+2?" + ASSISTANT + "4" + EOS + USER + "3+3?" + ASSISTANT + "<think>\n"
    )
    assert templates.thinks(tok)
    with_tools = templates.render_chat(tok, chat, TOOLS)  # its own template shows the tools
    assert render_tools_system(TOOLS) in with_tools and with_tools.endswith("<think>\n")
