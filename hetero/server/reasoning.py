"""DeepSeek-R1's reasoning split: a reply is `REASONING</think>\n\nCONTENT`.

R1's chat template ends the prompt with "<｜Assistant｜><think>\n", so generation starts inside the
reasoning (`starts_in_reasoning`, see `prompt_starts_reasoning`); a reply that itself begins with
"<think>" starts it too. Newlines at either end of the reasoning and at the start of the content
are dropped (R1 writes "<think>\n...\n</think>\n\n..."). A reply that never closes its reasoning
(cut by max_tokens, or a model that does not think in this format) is all reasoning with empty
content: a client shown half a thought as the answer would read it as the answer.
"""

from __future__ import annotations

from hetero.engine.detokenizer import partial_stop

OPEN = "<think>"
CLOSE = "</think>"


def prompt_starts_reasoning(prompt: str) -> bool:
    """Whether generation after this rendered prompt starts inside the reasoning."""
    return prompt.rstrip().endswith(OPEN)


def split_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply; reasoning is None when the reply has none."""
    if text.startswith(OPEN):
        text, starts_in_reasoning = text[len(OPEN) :], True
    if not starts_in_reasoning:
        return None, text
    reasoning, closed, content = text.partition(CLOSE)
    if not closed:
        return text.lstrip("\n"), ""
    return reasoning.strip("\n"), content.lstrip("\n")


class ReasoningStream:
    """split_reasoning one delta at a time: push/finish return (kind, text) pieces, kind
    "reasoning" or "content". For any split of a reply, the pieces of each kind add up to
    split_reasoning's (reasoning or "", content)."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "start"  # start → reasoning → content, or start → content
        self._held = ""  # text seen and not yet shown
        self._lead = True  # at the start of the current part: newlines there are dropped

    def push(self, delta: str) -> list[tuple[str, str]]:
        return self._step(delta, final=False)

    def finish(self) -> list[tuple[str, str]]:
        return self._step("", final=True)

    def _step(self, delta: str, final: bool) -> list[tuple[str, str]]:
        text = self._held + delta
        self._held = ""
        if self._state == "start":
            if not final and OPEN.startswith(text):  # may still become "<think>"
                self._held = text
                return []
            opened = text.startswith(OPEN)
            text = text[len(OPEN) :] if opened else text
            self._state = "reasoning" if opened or self._starts_in_reasoning else "content"
            self._lead = self._state == "reasoning"
        pieces = []
        if self._state == "reasoning":
            reasoning, closed, rest = text.partition(CLOSE)
            if closed:
                pieces += self._piece("reasoning", reasoning.rstrip("\n"))
                self._state, self._lead, text = "content", True, rest
            else:
                # Held: the start of "</think>" and the newlines before it, which are dropped if
                # it follows.
                end = len(text) - (0 if final else partial_stop(text, (CLOSE,)))
                if not final:
                    end = len(text[:end].rstrip("\n"))
                self._held = text[end:]
                return self._piece("reasoning", text[:end])
        return pieces + self._piece("content", text)

    def _piece(self, kind: str, text: str) -> list[tuple[str, str]]:
        if self._lead:
            text = text.lstrip("\n")
            self._lead = not text
        return [(kind, text)] if text else []
