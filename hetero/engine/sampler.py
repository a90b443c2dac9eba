"""Turns each running request's last logits into its next token, all rows in a few [B, V] ops.

Randomness is counter-based: the uniform behind token v of a request at step t is a hash of
(seed, t, v). A seeded request therefore draws the same tokens whatever else shares its batch,
after a preemption and restart, and on CPU or GPU alike, with no generator state to carry.
`reference_sample` is the per-row loop that `sample` is tested against."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hetero.engine.grammar import TokenMask, apply_mask
from hetero.engine.params import SamplingParams

# splitmix64 (Steele, Lea, Flood 2014), written as the signed int64 values with the same bits
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: log_softmax of the raw logits at the sampled token
    top_ids: torch.Tensor | None  # [B, n] int64, n = the most top logprobs any row asked for
    top_logprobs: torch.Tensor | None  # [B, n] float32


@dataclass(frozen=True)
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; greedy rows hold 1 so the softmax stays finite
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] int64; off is V
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: tokens the request has produced so far
    # Penalty tensors are None unless some row needs them, so the common step costs nothing
    repetition_penalty: torch.Tensor | None  # [B] float32
    seen: torch.Tensor | None  # [B, V] bool: in the prompt or the output
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    output_counts: torch.Tensor | None  # [B, V] float32: times each token was output
    logit_bias: torch.Tensor | None  # [B, V] float32
    all_greedy: bool
    filtered: bool  # some sampled row has top_k, top_p or min_p on: the step needs its sort
    max_logprobs: int | None  # the most top logprobs any row asked for; None: no row asked
    mask: TokenMask | None = None  # the tokens each row's grammar allows; None: no grammar

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        mask: TokenMask | None = None,
    ) -> SamplingBatch:
        B, V = len(params), vocab_size
        if not B == len(seeds) == len(steps) == len(prompt_ids) == len(output_ids):
            raise ValueError("params, seeds, steps, prompt_ids and output_ids differ in length")
        f32 = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)
        sampled = [p for p in params if not p.greedy]
        repetition = presence = frequency = seen = counts = bias = None
        if any(p.repetition_penalty != 1 for p in params):
            repetition = f32([p.repetition_penalty for p in params])
            both = [prompt + output for prompt, output in zip(prompt_ids, output_ids)]
            seen = _token_counts(both, V, device) > 0
        if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
            presence = f32([p.presence_penalty for p in params])
            frequency = f32([p.frequency_penalty for p in params])
            counts = _token_counts(output_ids, V, device)
        if any(p.logit_bias for p in params):
            rows = [b for b, p in enumerate(params) for _ in p.logit_bias]
            cols = [t for p in params for t, _ in p.logit_bias]
            values = f32([v for p in params for _, v in p.logit_bias])
            bias = torch.zeros(B, V, device=device)
            bias.index_put_((i64(rows), i64(cols)), values, accumulate=True)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=f32([1.0 if p.greedy else p.temperature for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            top_k=i64([p.top_k if 0 < p.top_k < V else V for p in params]),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            seeds=i64(seeds),
            steps=i64(steps),
            repetition_penalty=repetition,
            seen=seen,
            presence_penalty=presence,
            frequency_penalty=frequency,
            output_counts=counts,
            logit_bias=bias,
            all_greedy=not sampled,
            filtered=any(0 < p.top_k < V or p.top_p < 1 or p.min_p > 0 for p in sampled),
            max_logprobs=max(asked, default=None),
            mask=mask,
        )


def _token_counts(rows: list[list[int]], V: int, device: torch.device | str) -> torch.Tensor:
    """[B, V] float32: how many times each token occurs in each row's list."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    row = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # [N]
    token = torch.tensor([t for r in rows for t in r], dtype=torch.int64)  # [N]
    flat = (row * V + token).to(device)
    counts = torch.zeros(len(rows) * V, device=device)
    counts.scatter_add_(0, flat, torch.ones(flat.shape, device=device))
    return counts.view(len(rows), V)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic: clear the copied sign bits for a logical shift
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    # splitmix64's finalizer; int64 multiplication wraps mod 2**64 as the unsigned original does
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hash_uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] int64 seeds and steps -> [B, V] float64 uniforms in (0, 1); entry (b, v) depends on
    (seeds[b], steps[b], v) alone. Each (seed, step) keys a splitmix64 stream; v counts along it."""
    row = _mix(_mix(seeds + _GOLDEN) + steps * _GOLDEN)  # [B]
    counter = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN
    bits = _shr(_mix(row[:, None] + counter), 12)  # [B, V]: 52 bits, exact in float64
    # The half keeps u off 0 and 1, where the exponential below would be inf or 0
    return (bits.double() + 0.5) * 2.0**-52


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] float32 logits with the logit bias, then the repetition, presence and frequency
    penalties applied (vLLM's order); a new tensor, the input is left alone."""
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    if batch.repetition_penalty is not None:
        p = batch.repetition_penalty[:, None]  # [B, 1]
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(batch.seen, penalized, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0)
        logits = logits - batch.frequency_penalty[:, None] * counts
    return logits


def filter_probs(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """[B, V] probabilities with the tokens that top_k ([B], V: off), then top_p, then min_p drop
    set to 0; not renormalized. Like HF and vLLM, top_p counts mass within what top_k kept."""
    B, V = probs.shape
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]: the step's sort
    drop = torch.arange(V, device=probs.device) >= top_k[:, None]  # [B, V]
    kept = ranked.masked_fill(drop, 0)
    cum = kept.cumsum(-1)
    # Drop a token once the mass before it reaches top_p; the first token has none before it.
    # top_p = 1 is skipped outright so rounding in the cumsum can never drop the tail.
    before = cum - kept
    drop |= (before >= top_p[:, None] * cum[:, -1:]) & (top_p[:, None] < 1)
    drop |= ranked < min_p[:, None] * ranked[:, :1]
    return probs.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), 0)


def _race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # Exponential race (Gumbel-max in another guise): with E_v = -log u_v ~ Exp(1), argmax
    # p_v / E_v is v with probability p_v / sum(p). Dropped tokens (p = 0) never win, and the
    # argmax ignores scale, so the kept probabilities need no renormalizing.
    return (probs.double() / -torch.log(u)).argmax(-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """[B, V] logits -> the next token of each row, with logprobs of the raw logits."""
    B, V = logits.shape
    raw = logits.float()
    x = apply_penalties(raw, batch)
    if batch.mask is not None:  # in place: never into raw, whose logprobs are reported
        x = apply_mask(x.clone() if x is raw else x, batch.mask)
    tokens = x.argmax(-1)  # [B]
    if not batch.all_greedy:
        probs = torch.softmax(x / batch.temperature[:, None], dim=-1)
        if batch.filtered:
            probs = filter_probs(probs, batch.top_k, batch.top_p, batch.min_p)
        drawn = _race(probs, hash_uniforms(batch.seeds, batch.steps, V))
        tokens = torch.where(batch.greedy, tokens, drawn)
    return _with_logprobs(raw, tokens, batch.max_logprobs)


def _with_logprobs(raw: torch.Tensor, tokens: torch.Tensor, n: int | None) -> SampleOutput:
    logprobs = torch.log_softmax(raw, dim=-1)  # [B, V]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
    if n is None:
        return SampleOutput(tokens, chosen, None, None)
    top_logprobs, top_ids = logprobs.topk(n, dim=-1)  # [B, n]
    return SampleOutput(tokens, chosen, top_ids, top_logprobs)


def reference_sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> SampleOutput:
    """`sample` one request at a time with plain ops on its row: the slow, obvious version."""
    asked = [p.logprobs for p in params if p.logprobs is not None]
    n = max(asked, default=None)
    tokens, chosen, top_ids, top_logprobs = [], [], [], []
    for i, p in enumerate(params):
        token = _reference_token(logits[i], p, seeds[i], steps[i], prompt_ids[i], output_ids[i])
        logprobs = torch.log_softmax(logits[i].float(), dim=-1)  # [V]
        tokens.append(token)
        chosen.append(logprobs[token])
        if n is not None:
            values, ids = logprobs.topk(n)
            top_ids.append(ids)
            top_logprobs.append(values)
    tokens = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
    tops = (torch.stack(top_ids), torch.stack(top_logprobs)) if n is not None else (None, None)
    return SampleOutput(tokens, torch.stack(chosen), *tops)


def _reference_token(
    row: torch.Tensor, p: SamplingParams, seed: int, step: int, prompt: list[int], output: list[int]
) -> int:
    V = row.shape[0]
    x = row.float()
    bias = torch.zeros(V)
    for t, b in p.logit_bias:
        bias[t] += b
    x = x + bias.to(x.device)
    if p.repetition_penalty != 1:
        seen = torch.zeros(V, dtype=torch.bool, device=x.device)
        seen[sorted(set(prompt) | set(output))] = True
        r = p.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if p.presence_penalty != 0 or p.frequency_penalty != 0:
        counts = torch.zeros(V, device=x.device)
        for t, c in Counter(output).items():
            counts[t] = c
        x = x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    if p.greedy:
        return int(x.argmax())
    probs = torch.softmax(x / p.temperature, dim=-1)
    ranked, order = probs.sort(descending=True, stable=True)  # [V]
    keep = torch.ones(V, dtype=torch.bool, device=x.device)  # in ranked order
    if 0 < p.top_k < V:
        keep[p.top_k :] = False
    if p.top_p < 1:
        kept = ranked * keep
        cum = kept.cumsum(0)
        keep &= cum - kept < p.top_p * cum[-1]
    if p.min_p > 0:
        keep &= ranked >= p.min_p * ranked[0]
    probs = torch.zeros_like(probs).index_put_((order[keep],), ranked[keep])
    probs = probs / probs.sum()
    u = hash_uniforms(torch.tensor([seed]), torch.tensor([step]), V)[0].to(x.device)
    return int((probs.double() / -torch.log(u)).argmax())
