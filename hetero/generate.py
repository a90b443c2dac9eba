"""Static-batch generation: prefill every prompt together, then decode them step by step.

The serving engine (continuous batching, paged cache) replaces this loop later; it stays as the
simple reference that `hetero generate` and the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero.model import ForwardBatch, Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / params.temperature).softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest head >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


def generate(
    model: Transformer, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    """Completions (token ids, stop token included when hit) for each prompt."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + params.max_tokens)
    generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    feed = [list(p) for p in prompts]  # tokens each active sequence brings to the next step
    while active and params.max_tokens > 0:
        batch = ForwardBatch.build(
            active, [len(feed[i]) for i in active], [lens[i] for i in active], device
        )
        input_ids = torch.tensor([t for i in active for t in feed[i]], device=device)
        next_ids = sample(
            model(input_ids, batch, cache, last_only=True), params, generator
        ).tolist()
        still = []
        for i, tok in zip(active, next_ids):
            outputs[i].append(tok)
            done = tok in params.stop_token_ids or len(outputs[i]) >= params.max_tokens
            if not done:
                feed[i], lens[i] = [tok], lens[i] + 1
                still.append(i)
        active = still
    return outputs
