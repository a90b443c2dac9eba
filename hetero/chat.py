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
    import sys

    out = out or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    budget = max(1, engine.max_model_len - params.max_tokens)
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
        rid = engine.add_request(prompt_ids(tokenizer, messages, budget), params)
        out.write("hetero> ")
        reply = []
        try:
            for piece in _replies(engine, rid):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            engine.abort(rid)
            out.write(" [stopped]")
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
