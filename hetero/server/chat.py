"""`/v1/chat/completions`: messages -> the checkpoint's chat template -> prompt ids; the engine's
text -> OpenAI message deltas, with a reasoning model's `<think>` text split into
`reasoning_content` and DeepSeek-V3 tool calls parsed into `tool_calls`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.server import reasoning, templates, toolcalls
from hetero.server.errors import APIError
from hetero.server.protocol import ChatRequest, NamedToolChoice
from hetero.server.responses import (
    TokenText,
    chat_logprobs,
    choice_params,
    collect,
    max_tokens_for,
    new_id,
    usage,
)
from hetero.server.state import Loaded, ServerConfig


@dataclass(frozen=True)
class ChatJob:
    id: str
    created: int
    model: str
    prompt_ids: list[int]
    params: list[SamplingParams]  # one a choice
    tools: bool  # parse tool calls out of the text
    thinks: bool  # split reasoning out of the text
    starts_thinking: bool  # the prompt opened the <think> block
    include_usage: bool
    text: TokenText
    arrived: float


def prepare(body: ChatRequest, loaded: Loaded, config: ServerConfig) -> ChatJob:
    """The prompt and the engine's parameters of a chat request (400s for what cannot run)."""
    tok = loaded.tokenizer
    use_tools = bool(body.tools) and body.tool_choice != "none"
    tools = [t.model_dump() for t in body.tools] if use_tools else None
    try:  # (a tool call without a name is refused while converting)
        messages = toolcalls.chat_messages_for_template([m.model_dump() for m in body.messages])
        text = templates.render_chat(tok, messages, tools)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    prompt_ids = tok.encode(text, add_special_tokens=False)
    m = max_tokens_for(body.requested_max_tokens, len(prompt_ids), loaded.context, "messages")
    extra = {}
    grammar = _grammar(body)
    if grammar is not None:
        extra["grammar"] = grammar
    # tool calls are made of special tokens: the text keeps them for the parser
    skip = body.skip_special_tokens and not use_tools
    base = replace(body.sampling(m, body.top_n, **extra), skip_special_tokens=skip)
    thinks = config.reasoning and body.separate_reasoning and templates.thinks(tok)
    return ChatJob(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=config.model_name,
        prompt_ids=prompt_ids,
        params=choice_params(base, body.n),
        tools=use_tools,
        thinks=thinks,
        starts_thinking=thinks and text.rstrip().endswith(reasoning.OPEN),
        include_usage=body.include_usage,
        text=TokenText(tok),
        arrived=time.perf_counter(),
    )


def _grammar(body: ChatRequest):
    """The constraint on the output, if any: a forced tool call, JSON, or a JSON schema."""
    from hetero.engine.grammar import GrammarSpec

    choice = body.tool_choice
    if body.tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        name = choice.function.get("name") if isinstance(choice, NamedToolChoice) else None
        tools = [t.model_dump() for t in body.tools]
        return GrammarSpec("tool_calls", json.dumps({"tools": tools, "name": name}))
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object", "")
    return GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_))


class ChoiceText:
    """One choice's text -> message delta fields, as it streams."""

    def __init__(self, job: ChatJob) -> None:
        self.think = reasoning.ReasoningStream(job.starts_thinking) if job.thinks else None
        self.calls = toolcalls.ToolCallStream() if job.tools else None
        self.made_calls = False

    def push(self, text: str) -> dict:
        parts = self.think.push(text) if self.think else [("content", text)]
        return self._delta(parts)

    def finish(self) -> dict:
        parts = self.think.finish() if self.think else []
        delta = self._delta(parts)
        if self.calls is not None:
            _merge(delta, self._events(self.calls.finish()))
        return delta

    def _delta(self, parts) -> dict:
        delta: dict = {}
        for kind, text in parts:
            if kind == "reasoning":
                delta["reasoning_content"] = delta.get("reasoning_content", "") + text
            elif self.calls is not None:
                _merge(delta, self._events(self.calls.push(text)))
            elif text:
                delta["content"] = delta.get("content", "") + text
        return delta

    def _events(self, events) -> dict:
        delta: dict = {}
        for e in events:
            if isinstance(e, toolcalls.ContentDelta):
                if e.text:
                    delta["content"] = delta.get("content", "") + e.text
            else:
                self.made_calls = True
                delta.setdefault("tool_calls", []).append(e.to_openai())
        return delta


def _merge(into: dict, more: dict) -> None:
    for key, value in more.items():
        into[key] = into[key] + value if key in into else value


def _base(job: ChatJob) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
            "model": job.model}  # fmt: skip


async def stream(
    job: ChatJob, outputs: AsyncIterator[tuple[int, RequestOutput]], metrics
) -> AsyncIterator[dict]:
    base, n = _base(job), len(job.params)
    texts = [ChoiceText(job) for _ in range(n)]
    extra = {"usage": None} if job.include_usage else {}
    for i in range(n):  # the role first, as OpenAI sends it
        yield base | {"choices": [_chunk(i, {"role": "assistant", "content": ""})]} | extra
    last: dict[int, RequestOutput] = {}
    async for i, out in outputs:
        metrics.observe(out, job.arrived)
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error}")
        delta = texts[i].push(out.text)
        lp = None
        if job.params[i].logprobs is not None and out.logprobs:
            lp = {"content": chat_logprobs(out.logprobs, job.text)}
        reason = None
        if out.finished:
            last[i] = out
            _merge(delta, texts[i].finish())
            reason = "tool_calls" if texts[i].made_calls else out.finish_reason
        if delta or lp or reason:
            yield base | {"choices": [_chunk(i, delta, lp, reason)]} | extra
    if job.include_usage:
        yield base | {"choices": [], "usage": usage(last, len(job.prompt_ids))}


def _chunk(i: int, delta: dict, logprobs=None, reason=None) -> dict:
    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


async def complete(
    job: ChatJob, outputs: AsyncIterator[tuple[int, RequestOutput]], metrics
) -> dict:
    n = len(job.params)
    texts, lps, last = await collect(outputs, n, metrics, job.arrived)
    choices = []
    for i in range(n):
        message, made_calls = _message(job, texts[i])
        lp = (
            {"content": chat_logprobs(tuple(lps[i]), job.text)}
            if job.params[i].logprobs is not None
            else None
        )
        reason = "tool_calls" if made_calls else last[i].finish_reason
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(last, len(job.prompt_ids))}  # fmt: skip


def _message(job: ChatJob, text: str) -> tuple[dict, bool]:
    message: dict = {"role": "assistant", "content": text}
    if job.thinks:
        thought, text = reasoning.split_reasoning(text, job.starts_thinking)
        message["reasoning_content"], message["content"] = thought, text
    if job.tools:
        content, calls = toolcalls.parse_tool_calls(text)
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [c.to_openai() for c in calls]
            return message, True
    return message, False
