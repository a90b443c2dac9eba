"""`/v1/completions` (prompt in, text out) and the response pieces both endpoints share: ids,
usage, logprobs, finish reasons."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from hetero.engine.outputs import RequestOutput, TokenLogprob
from hetero.engine.params import SamplingParams
from hetero.server.errors import APIError
from hetero.server.protocol import CompletionRequest
from hetero.server.state import Loaded


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams a choice: with a seed, choice i draws with seed + i, so the n choices
    differ and the whole answer is reproducible."""
    if base.seed is None or n == 1:
        return [base] * n
    return [replace(base, seed=(base.seed + i) % 2**63) for i in range(n)]


def max_tokens_for(requested: int | None, prompt_len: int, context: int, param: str) -> int:
    """The request's max_tokens, by default what the context leaves after the prompt."""
    if requested is not None:
        return requested
    left = context - prompt_len
    if left < 1:
        raise APIError(
            400,
            f"this model's context is {context} tokens and the prompt has {prompt_len}: "
            "no room for an answer",
            param=param,
        )
    return left


def usage(outs: dict[int, RequestOutput], prompt_tokens: int) -> dict:
    """OpenAI's usage of a request: the prompt once, every choice's completion tokens."""
    done = [o.usage for o in outs.values()]
    completion = sum(u.completion_tokens for u in done)
    cached = max((u.cached_tokens for u in done), default=0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class TokenText:
    """A token's own text (as OpenAI reports tokens in logprobs), decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


def chat_logprobs(lps: tuple[TokenLogprob, ...], text: TokenText) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    return [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps]  # fmt: skip


async def collect(
    outputs: AsyncIterator[tuple[int, RequestOutput]], n: int, metrics, arrived: float
) -> tuple[list[str], list[list[TokenLogprob]], dict[int, RequestOutput]]:
    """A non-streaming answer's n choices: each one's text, logprobs and last output."""
    texts, lps, last = [""] * n, [[] for _ in range(n)], {}
    async for i, out in outputs:
        metrics.observe(out, arrived)
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error}")
        texts[i] += out.text
        lps[i] += out.logprobs or ()
        if out.finished:
            last[i] = out
    return texts, lps, last


# -- /v1/completions ----------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionJob:
    id: str
    created: int
    model: str
    prompts: list[list[int]]  # one engine request a (prompt, choice): prompt p, choice i at p*n+i
    params: list[SamplingParams]
    prompt_texts: list[str]  # for echo
    n: int
    include_usage: bool
    text: TokenText
    logprobs: bool
    arrived: float  # time.perf_counter() when the request came in


def prepare_completion(body: CompletionRequest, loaded: Loaded, model: str) -> CompletionJob:
    tok = loaded.tokenizer
    prompts = body.prompts(lambda s: tok.encode(s))
    if any(not p for p in prompts):
        raise APIError(400, "prompt: an empty prompt has no token to start from", param="prompt")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", "echo")
    params, texts = [], []
    for p in prompts:
        m = max_tokens_for(body.max_tokens, len(p), loaded.context, "prompt")
        params += choice_params(body.sampling(m, body.logprobs), body.n)
        if body.echo:
            try:
                texts.append(tok.decode(p, skip_special_tokens=body.skip_special_tokens))
            except (OverflowError, IndexError, TypeError, ValueError) as e:
                raise APIError(400, f"prompt: token ids the tokenizer cannot decode ({e})",
                               param="prompt") from None  # fmt: skip
    return CompletionJob(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=model,
        prompts=[p for p in prompts for _ in range(body.n)],
        params=params,
        prompt_texts=texts,
        n=body.n,
        include_usage=body.include_usage,
        text=TokenText(tok),
        logprobs=body.logprobs is not None,
        arrived=time.perf_counter(),
    )


def _completion_logprobs(lps, text: TokenText, offset: int) -> dict:
    tokens = [text(lp.token) for lp in lps]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _base(job: CompletionJob) -> dict:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}


async def stream_completion(
    job: CompletionJob, outputs: AsyncIterator[tuple[int, RequestOutput]], metrics
) -> AsyncIterator[dict]:
    base, last, offsets = _base(job), {}, {}
    for i in range(len(job.prompts)) if job.prompt_texts else ():
        text = job.prompt_texts[i // job.n]
        offsets[i] = len(text)
        yield base | {"choices": [_choice(i, text, None, None)]} | _no_usage(job)
    async for i, out in outputs:
        metrics.observe(out, job.arrived)
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error}")
        lp = None
        if job.logprobs and out.logprobs:
            lp = _completion_logprobs(out.logprobs, job.text, offsets.get(i, 0))
        offsets[i] = offsets.get(i, 0) + len(out.text)
        reason = out.finish_reason  # the engine's reasons are OpenAI's (+ abort, error)
        if out.text or lp or reason:
            yield base | {"choices": [_choice(i, out.text, lp, reason)]} | _no_usage(job)
        if out.finished:
            last[i] = out
    if job.include_usage:
        yield base | {"choices": [], "usage": _usage_all(job, last)}


async def complete_completion(
    job: CompletionJob, outputs: AsyncIterator[tuple[int, RequestOutput]], metrics
) -> dict:
    texts, lps, last = await collect(outputs, len(job.prompts), metrics, job.arrived)
    choices = []
    for i in range(len(job.prompts)):
        lp = _completion_logprobs(lps[i], job.text, 0) if job.logprobs else None
        echo = job.prompt_texts[i // job.n] if job.prompt_texts else ""
        choices.append(_choice(i, echo + texts[i], lp, last[i].finish_reason))
    return _base(job) | {"choices": choices, "usage": _usage_all(job, last)}


def _choice(i: int, text: str, logprobs, reason) -> dict:
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _no_usage(job) -> dict:
    return {"usage": None} if job.include_usage else {}


def _usage_all(job: CompletionJob, last: dict[int, RequestOutput]) -> dict:
    """Each distinct prompt counted once, every choice's completion tokens."""
    prompt = sum(len(job.prompts[p * job.n]) for p in range(len(job.prompts) // job.n))
    return usage(last, prompt)
