"""`hetero chat`: a conversation in the terminal, the reply streamed as it is sampled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TextIO

from hetero.engine.engine import Engine
from hetero.engine.params import SamplingParams

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."
QUIT = "(/exit or Ctrl-D quits)"


def line_editing() -> None:
    """Arrow keys, history and Ctrl-A/E for `input()`: without readline loaded a terminal's
    arrow keys arrive as escape sequences and become part of the message (^[[D)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it
        pass


def prompt_ids(tokenizer, messages: list[dict], budget: int) -> list[int]:
    """The chat template applied to the conversation, dropping the oldest turns (never the
    last user message) until it fits `budget` tokens."""
    while True:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= budget or len(messages) <= 1:
            return ids[-budget:]
        messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]


def chat_loop(
    engine: Engine,
    tokenizer,
    params: SamplingParams,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    system: str | None = None,
) -> int:
    """Reads user turns with `read` until /exit or end of input; returns the turns answered.
    Every turn is a request to `engine`, whose prefix cache keeps the earlier turns' pages: a
    turn prefills only what the last reply and the new message add."""
    budget = max(1, engine.max_model_len - params.max_tokens)

    def send(messages: list[dict]) -> tuple[Iterator[str], Callable[[], None]]:
        rid = engine.add_request(prompt_ids(tokenizer, messages, budget), params)
        return _replies(engine, rid), lambda: engine.abort(rid)

    return _converse(send, read, out, system)


def remote_chat_loop(
    url: str,
    params: SamplingParams,
    api_key: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    system: str | None = None,
) -> int:
    """`chat_loop` against a running `hetero serve` (or any OpenAI-compatible server) at `url`:
    each turn is a streamed /v1/chat/completions request; closing it aborts the reply."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(10, read=None))
    model = client.get("/models").raise_for_status().json()["data"][0]["id"]

    def send(messages: list[dict]) -> tuple[Iterator[str], Callable[[], None]]:
        body = {"model": model, "messages": messages, "stream": True,
                "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.seed}  # fmt: skip
        response = client.send(client.build_request("POST", "/chat/completions", json=body),
                               stream=True)  # fmt: skip
        return _sse_text(response), response.close

    try:
        return _converse(send, read, out, system)
    finally:
        client.close()


def _sse_text(response) -> Iterator[str]:
    """The content deltas of a streamed chat completion; an error body becomes a RuntimeError."""
    import json

    if response.status_code != 200:
        body = response.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"the server answered {response.status_code}: {body}")
    for line in response.iter_lines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", ()):
                yield choice["delta"].get("content") or ""


def _converse(send, read: Callable[[str], str], out: TextIO | None, system: str | None) -> int:
    """The terminal loop; `send(messages)` -> (the reply's pieces, a function that stops it)."""
    import sys

    out = out or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    turns = 0
    if read is input:
        line_editing()
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return turns
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell or Python's REPL does
            out.write("\n" + QUIT + "\n")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return turns
        if line == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("hetero> ")
        reply = []
        pieces, stop = send(messages)
        try:
            for piece in pieces:
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stop()
            out.write(" [stopped]")
        except RuntimeError as e:  # a server's error: say it, keep the conversation
            out.write(f"[error: {e}]")
            messages.pop()
            out.write("\n")
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        turns += 1


def _replies(engine: Engine, rid: str) -> Iterator[str]:
    """The text of request `rid` as the engine's steps produce it."""
    while engine.has_work:
        for o in engine.step():
            if o.request_id == rid:
                yield o.text
                if o.finished:
                    return
