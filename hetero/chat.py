"""`hetero chat`: a conversation in the terminal, the reply streamed as it is sampled."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from hetero.generate import SamplingParams, stream
from hetero.model import Transformer

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."
QUIT = "(/exit or Ctrl-D quits)"


def line_editing() -> None:
    """Arrow keys, history and Ctrl-A/E for `input()`: without readline loaded a terminal's
    arrow keys arrive as escape sequences and become part of the message (^[[D)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it
        pass


class Detokenizer:
    """Token ids in, new text out: text is held back while it ends inside a UTF-8 character
    (byte-level BPE splits them), so the terminal never shows a replacement character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new


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
    model: Transformer,
    tokenizer,
    params: SamplingParams,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    prefill_chunk: int = 0,
    system: str | None = None,
    graphs: bool = False,
) -> int:
    """Reads user turns with `read` until /exit or end of input; returns the turns answered."""
    import sys

    out = out or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    budget = max(1, model.config.max_position_embeddings - params.max_tokens)
    stop = set(params.stop_token_ids)
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
        ids = prompt_ids(tokenizer, messages, budget)
        detok = Detokenizer(tokenizer)
        out.write("hetero> ")
        try:
            for step in stream(model, [ids], params, prefill_chunk, graphs):
                for _, token in step:
                    if token not in stop:
                        out.write(detok.push(token))
                        out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        reply = tokenizer.decode(detok.ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        turns += 1
