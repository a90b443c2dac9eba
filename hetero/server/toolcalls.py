"""DeepSeek-V3's tool-call format (its chat template's special tokens): one assistant turn

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>            (further calls: "\n" then another <｜tool▁call▁begin｜>...)
    <｜tool▁calls▁end｜>

and a tool's answer in the next turn:
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>CONTENT<｜tool▁output▁end｜><｜tool▁outputs▁end｜>

Parsing works on the literal token strings (the server decodes with skip_special_tokens=False when
tools are on). What a reply may hold, and what is tolerated:
- content before CALLS_BEGIN: the reply's content. After a call, what does not begin another
  (CALLS_END, an eos, stray text) ends the calls and is dropped;
- a missing CALLS_END, a missing ARGS_CLOSE, a last call cut at CALLS_END or eos without CALL_END;
- anything else malformed (no call, no SEP, a name with spaces, arguments that are not one JSON
  object) makes parse_tool_calls return the whole reply as content.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hetero.engine.detokenizer import first_stop, partial_stop

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
ARGS_OPEN = "\n```json\n"  # between NAME and ARGUMENTS
ARGS_CLOSE = "\n```"  # between ARGUMENTS and CALL_END
TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP,
          OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END)  # fmt: skip
EOS = "<｜end▁of▁sentence｜>"  # DeepSeek-V3's eos, as text when special tokens are kept
ARGS_ENDS = (CALL_END, CALLS_END, EOS)  # the first of these ends a call's arguments


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" + 24 hex digits
    name: str
    arguments: str  # one JSON object, as generated (stripped)

    def to_openai(self) -> dict:
        """The call as in an OpenAI chat completion's message.tool_calls."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def format_call(name: str, arguments: str) -> str:
    """One call in the model's format (CALL_BEGIN ... CALL_END)."""
    return CALL_BEGIN + "function" + SEP + name + ARGS_OPEN + arguments + ARGS_CLOSE + CALL_END


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply; a malformed call section gives (text, [])."""
    start = text.find(CALLS_BEGIN)
    calls = [] if start < 0 else _parse_calls(text[start + len(CALLS_BEGIN) :])
    return (text[:start], calls) if calls else (text, [])


def _parse_calls(section: str) -> list[ToolCall]:
    """The calls in the text after CALLS_BEGIN, or [] if any part of it is malformed."""
    calls: list[ToolCall] = []
    pos = 0
    while True:
        body = section[pos:].lstrip()
        if not body.startswith(CALL_BEGIN):  # the end, or text after the calls
            return calls
        pos = len(section) - len(body) + len(CALL_BEGIN)
        opened = section.find(ARGS_OPEN, pos)
        hit = first_stop(section[pos:], ARGS_ENDS)
        name = _call_name(section[pos:opened]) if opened >= 0 else None
        if name is None or (hit is not None and pos + hit[0] < opened):
            return []
        pos = opened + len(ARGS_OPEN)
        hit = first_stop(section[pos:], ARGS_ENDS)
        end = len(section) if hit is None else pos + hit[0]
        arguments = _arguments(section[pos:end])
        if not _is_object(arguments):
            return []
        calls.append(ToolCall(new_call_id(), name, arguments))
        if hit is None or hit[1] != CALL_END:
            return calls
        pos = end + len(CALL_END)


def _call_name(header: str) -> str | None:
    """NAME of "function<｜tool▁sep｜>NAME", None if it is no such header."""
    name = header.partition(SEP)[2].strip()  # "" without SEP
    return name if name and not any(c.isspace() for c in name) else None


def _arguments(raw: str) -> str:
    """The arguments between ARGS_OPEN and the end marker, without the closing fence."""
    return raw.strip().removesuffix("```").strip()


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _held_tail(text: str) -> int:
    """Characters at the end of streamed arguments not to send yet: the start of an end marker,
    and before it whitespace and backticks, which may be the closing fence."""
    end = len(text) - partial_stop(text, ARGS_ENDS)
    while end and (text[end - 1].isspace() or text[end - 1] == "`"):
        end -= 1
    return len(text) - end


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of tool call `index`: its first has id and name (and no arguments), the later
    ones append to its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict:
        """The piece as in an OpenAI chat.completion.chunk's delta.tool_calls."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


Event = ContentDelta | CallDelta


class ToolCallStream:
    """parse_tool_calls one delta at a time: content streams until CALLS_BEGIN (a tail that may
    begin it is held, as stop strings are); a call is announced once its name is complete and its
    arguments stream as they arrive. For any split of a reply whose calls parse, the events add up
    to parse_tool_calls(reply). A section found malformed before any call was announced comes out
    whole as content (as parse_tool_calls does); found malformed later (say, arguments cut by
    max_tokens), the text not yet covered by an event comes out as content: sent pieces stay sent.
    """

    def __init__(self) -> None:
        self._state = "content"  # content → between ⇄ header → args; → done | failed
        self._text = ""  # content: text not yet shown; later: the reply from CALLS_BEGIN on
        self._pos = 0  # parse position in _text
        self._shown = 0  # _text[:_shown] is covered by events
        self._args = 0  # where the current call's arguments start in _text
        self._sent = 0  # characters of the current call's arguments sent
        self._calls = 0  # calls announced

    def push(self, delta: str) -> list[Event]:
        return self._step(delta, final=False)

    def finish(self) -> list[Event]:
        return self._step("", final=True)

    def _step(self, delta: str, final: bool) -> list[Event]:
        if self._state == "failed":
            return [ContentDelta(delta)] if delta else []
        if self._state == "done":
            return []
        self._text += delta
        events: list[Event] = []
        if self._state == "content":
            start = self._text.find(CALLS_BEGIN)
            if start < 0:
                cut = len(self._text) - (0 if final else partial_stop(self._text, (CALLS_BEGIN,)))
                shown, self._text = self._text[:cut], self._text[cut:]
                return [ContentDelta(shown)] if shown else []
            if start:
                events.append(ContentDelta(self._text[:start]))
            self._text, self._pos, self._state = self._text[start:], len(CALLS_BEGIN), "between"
        handlers = {"between": self._between, "header": self._header, "args": self._arguments}
        state = None
        while self._state in handlers and self._state != state:  # until it waits for more text
            state = self._state
            events += handlers[state](final)
        return events

    def _between(self, final: bool) -> list[Event]:
        rest = self._text[self._pos :]
        body = rest.lstrip()
        if body.startswith(CALL_BEGIN):
            self._pos += len(rest) - len(body) + len(CALL_BEGIN)
            self._state = "header"
            return []
        if not final and CALL_BEGIN.startswith(body):
            return []
        return self._end() if self._calls else self._fail()

    def _header(self, final: bool) -> list[Event]:
        opened = self._text.find(ARGS_OPEN, self._pos)
        hit = first_stop(self._text[self._pos :], ARGS_ENDS)
        if hit is not None and (opened < 0 or self._pos + hit[0] < opened):
            return self._fail()
        if opened < 0:
            return self._fail() if final else []
        name = _call_name(self._text[self._pos : opened])
        if name is None:
            return self._fail()
        self._pos = self._args = self._shown = opened + len(ARGS_OPEN)
        self._sent, self._calls, self._state = 0, self._calls + 1, "args"
        return [CallDelta(self._calls - 1, id=new_call_id(), name=name)]

    def _arguments(self, final: bool) -> list[Event]:
        raw = self._text[self._args :]
        hit = first_stop(raw, ARGS_ENDS)
        if hit is None and not final:
            ready = raw[: len(raw) - _held_tail(raw)]
            body = ready.lstrip()
            return self._send(body, self._args + len(ready))
        end = len(raw) if hit is None else hit[0]
        arguments = _arguments(raw[:end])
        if not _is_object(arguments):
            return self._fail()
        events = self._send(arguments, self._args + end)
        if hit is not None and hit[1] == CALL_END:
            self._pos = self._shown = self._args + end + len(CALL_END)
            self._state = "between"
            return events
        return events + self._end()

    def _send(self, arguments: str, covered: int) -> list[Event]:
        """Sends what `arguments` (the current call's so far) adds to what was sent."""
        new = arguments[self._sent :]
        self._sent, self._shown = len(arguments), covered
        return [CallDelta(self._calls - 1, new)] if new else []

    def _end(self) -> list[Event]:
        self._state, self._text = "done", ""
        return []

    def _fail(self) -> list[Event]:
        rest = self._text[self._shown :]
        self._state, self._text = "failed", ""
        return [ContentDelta(rest)] if rest else []


def render_tools_system(tools: Sequence[Mapping]) -> str:
    """The system-prompt text that lists the tools and the call format, for chat templates that
    ignore `tools`. Tools as in an OpenAI request: {"type": "function", "function": {...}}."""
    example = CALLS_BEGIN + format_call("FUNCTION_NAME", '{"ARGUMENT": "VALUE"}') + CALLS_END
    lines = ["## Tools", "", "You can call the following functions.", ""]
    for tool in tools:
        function = tool.get("function", tool)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"a tool without a function name: {json.dumps(tool, default=str)[:200]}"
            )
        lines.append(f"### {name}")
        if function.get("description"):
            lines.append(f"Description: {function['description']}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        lines += [f"Parameters: {json.dumps(parameters, ensure_ascii=False)}", ""]
    lines += [
        "To call functions, end your reply with the calls in exactly this format:",
        example,
        f"Put each further call on a new line after {CALL_END}, before {CALLS_END}. The "
        "arguments are one JSON object that follows the function's parameters schema.",
    ]
    return "\n".join(lines)


def chat_messages_for_template(messages: Sequence[Mapping]) -> list[dict]:
    """OpenAI chat messages → the dicts DeepSeek-V3's chat template reads: content as a string
    (text parts joined by newlines), an assistant's tool_calls as {"type", "function": {"name",
    "arguments" (a JSON string)}} with content None when empty, a tool reply as role "tool" with
    its content, "developer" as "system". Converting converted messages changes nothing."""
    out = []
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"a message without a role: {json.dumps(message, default=str)[:200]}")
        content = _text(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            calls = [_template_call(call) for call in message["tool_calls"]]
            out.append({"role": role, "content": content or None, "tool_calls": calls})
        elif role == "tool":
            out.append(
                {"role": role, "content": content, "tool_call_id": message.get("tool_call_id")}
            )
        else:
            out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _text(content: str | Sequence[Mapping] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"only text content parts are supported, not {part.get('type')!r}")
        parts.append(part["text"])
    return "\n".join(parts)


def _template_call(call: Mapping) -> dict:
    function = call.get("function") or {}
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"a tool call without a function name: {json.dumps(call, default=str)[:200]}"
        )
    if not isinstance(arguments, str):  # some clients send the object itself
        arguments = json.dumps(arguments, ensure_ascii=False)
    out = {
        "type": call.get("type") or "function",
        "function": {"name": name, "arguments": arguments},
    }
    return {"id": call["id"], **out} if call.get("id") else out
