"""Token ids to text, one step at a time: what a streaming response may show after each token.

Two layers. The first turns ids into *stable* text, text no later token can change. Byte-level
BPE splits a character's UTF-8 bytes over several tokens, and decode() renders an unfinished
character as U+FFFD, so a tail of U+FFFD is held until a later token finishes it (or `flush`).
For byte-level decoders with no space clean-up, decode(a + b) == decode(a) + decode(b) whenever
decode(a) does not end in U+FFFD, so only a short window of ids is decoded per token, as in vLLM:
ids[prefix:] against ids[prefix:read], with the offsets moving on at each clean boundary. Any
other tokenizer (space prefixes stripped at the start, clean-up rules that rewrite " ." to ".")
decodes the whole output each token instead: quadratic, but exactly decode(output_ids).

The second layer holds back the tail that could still begin a stop string and cuts the text
before the first stop string found. Tokens are taken one at a time even when pushed in chunks,
so the deltas' concatenation, the stop and `output_ids` do not depend on the chunking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # decode()'s rendering of bytes that are not (yet) a whole character
SEED_TOKENS = 5  # prompt ids that seed the window (vLLM's initial offset)


class Delta(NamedTuple):
    text: str  # new text that may be shown now
    stopped: str | None  # the stop string that ended the output, else None


def decodes_by_concatenation(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether decode(a + b) == decode(a) + decode(b) for every a whose decode does not end in
    U+FFFD: true of a fast tokenizer with transformers' own decode, a ByteLevel decoder (bytes are
    concatenated, then read as UTF-8) and no clean-up of spaces."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    kind = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        # subclasses such as Whisper's rewrite the text in their own decode
        and kind.decode is PreTrainedTokenizerFast.decode
        and kind._decode is PreTrainedTokenizerFast._decode
        and isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        and not tokenizer.clean_up_tokenization_spaces
    )


class IncrementalDetokenizer:
    """One request's output text, streamed; see the module docstring.

    `prompt_ids` seed the decoding window only, the text is the output's. After a stop string,
    `output_ids` ends with the token that completed it and later tokens are ignored."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int] | None = None,
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str) or not all(stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._windowed = decodes_by_concatenation(tokenizer)
        # Rewrites such as " ." -> "." start at a space: hold the last space and what follows.
        self._hold_space = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        seed = list(prompt_ids or [])[-SEED_TOKENS:] if self._windowed else []
        seed_text = self._decode(seed)
        if seed_text.endswith(REPLACEMENT):  # the prompt may end inside a character
            seed, seed_text = [], ""
        self._ids = seed
        self._n_seed = len(seed)
        # The window is decode(ids[prefix:]); decode(ids[prefix:read]) has prefix_chars
        # characters and the window's first `done` characters have been passed on.
        self._prefix, self._read = 0, len(seed)
        self._prefix_chars = self._done = len(seed_text)
        self._pending = ""  # stable text held back: it could begin a stop string
        self._parts: list[str] = []
        self._stopped: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._n_seed :]

    @property
    def stopped(self) -> str | None:
        return self._stopped

    def push(self, token_ids: list[int]) -> Delta:
        """Appends the output's next tokens; returns the text that may be shown now."""
        if self._flushed and self._stopped is None:
            raise RuntimeError("push after flush")
        out = []
        for token_id in token_ids:
            if self._stopped is not None:
                break
            self._ids.append(int(token_id))
            out.append(self._through_stops(self._stable_text(), final=False))
        text = "".join(out)
        self._parts.append(text)
        return Delta(text, self._stopped)

    def flush(self) -> str:
        """At the end of the request: the text still held back, an unfinished character as
        decode() renders it. Nothing can be pushed after."""
        if self._flushed or self._stopped is not None:
            self._flushed = True
            return ""
        self._flushed = True
        tail = self._decode(self._ids[self._prefix :])[self._done :]
        text = self._through_stops(tail, final=True)
        self._parts.append(text)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _stable_text(self) -> str:
        """The new text that no later token can change."""
        window = self._decode(self._ids[self._prefix :])
        stable = window.rstrip(REPLACEMENT)
        if self._hold_space and " " in stable:
            stable = stable[: stable.rindex(" ")]
        new = stable[self._done :]
        self._done = max(self._done, len(stable))
        if self._windowed and len(stable) == len(window):
            # A clean boundary: the window restarts at the last one, one step of context.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_chars = self._done = len(window) - self._prefix_chars
        return new

    def _through_stops(self, new: str, final: bool) -> str:
        """`new` stable text after the stop strings: the part that may be shown now."""
        # Shown text never ends with the start of a stop string, so a match starts in `text`.
        text = self._pending + new
        hit = first_stop(text, self._stop)
        if hit is not None:
            end, self._stopped = hit
            self._pending = ""
            return text[:end]
        keep = 0 if final else partial_stop(text, self._stop)
        self._pending = text[len(text) - keep :]
        return text[: len(text) - keep]


def first_stop(text: str, stop: tuple[str, ...]) -> tuple[int, str] | None:
    """(where, which) of the earliest stop string in text; at equal positions the first listed."""
    hits = [(at, i) for i, s in enumerate(stop) if (at := text.find(s)) >= 0]
    if not hits:
        return None
    at, i = min(hits)
    return at, stop[i]


def partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    ends = (n for s in stop for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n]))
    return max(ends, default=0)
