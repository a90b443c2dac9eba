"""What the engine hands back for a request, step by step."""

from __future__ import annotations

from dataclasses import dataclass

from hetero.engine.request import Usage


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # log_softmax of the model's logits (before penalties and temperature)
    top: tuple[tuple[int, float], ...] = ()  # the n most likely (token, logprob), n as asked


@dataclass(frozen=True)
class RequestOutput:
    """A request's new tokens since its last output; `finish_reason` set on its last one
    ("stop": a stop token or string, "length": max_tokens, "abort", "error")."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    usage: Usage
    stop: str | None = None  # the stop string that ended it
    ttft_s: float | None = None  # on the first output with a token: arrival -> first token
    tpot_s: float | None = None  # on the last: mean time between its output tokens
    error: str | None = None  # finish_reason "error": what went wrong

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
