"""Static-batch generation: prefill every prompt together, then decode them step by step.

The serving engine (continuous batching, paged cache) replaces this loop later; it stays as the
simple reference that `hetero generate` and the tests use.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    prefill_chunk: int = 0,
    graphs: bool = False,
) -> list[list[int]]:
    """Completions (token ids, stop token included when hit) for each prompt."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, params, prefill_chunk, graphs):
        for i, tok in step:
            outputs[i].append(tok)
    return outputs


def stream(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    prefill_chunk: int = 0,
    graphs: bool = False,
) -> Iterator[list[tuple[int, int]]]:
    """Yields, step by step, the (prompt index, token) pairs that step produced. `prefill_chunk`:
    at most this many prompt tokens of a sequence a step (0: the whole prompt at once), so a
    long prompt's activations stay bounded. `graphs`: once every prompt is in, decode steps run
    from hetero.sched.graphs (CUDA graphs on a GPU; its eager segments elsewhere) over all the
    batch's slots, finished ones included (their outputs are dropped)."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + params.max_tokens)
    generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
    produced = [0] * len(prompts)
    active = list(range(len(prompts)))
    lens = [0] * len(prompts)  # tokens of each sequence in the cache after this step
    feed = [list(p) for p in prompts]  # tokens each active sequence still has to bring
    last = [p[-1] for p in prompts]  # each sequence's latest token (fed again once finished)
    decoder = None
    while active and params.max_tokens > 0:
        # decoding: every prompt already in the cache, one new token a sequence
        decoding = graphs and all(lens[i] >= len(p) for i, p in enumerate(prompts))
        step = {i: feed[i][: prefill_chunk or len(feed[i])] for i in active}
        for i in active:
            lens[i] += len(step[i])
            last[i] = step[i][-1]
        if decoding:
            if decoder is None:
                from hetero.sched.graphs import GraphedDecoder

                decoder = GraphedDecoder(model, cache, graphs=device.type == "cuda")
            ids = torch.tensor(last, device=device)
            positions = torch.tensor([n - 1 for n in lens], device=device)
            logits = decoder.step(ids, positions)[torch.tensor(active, device=device)]
        else:
            batch = ForwardBatch.build(
                active, [len(step[i]) for i in active], [lens[i] for i in active], device
            )
            input_ids = torch.tensor([t for i in active for t in step[i]], device=device)
            logits = model(input_ids, batch, cache, last_only=True)
        next_ids = sample(logits, params, generator).tolist()
        still, out = [], []
        for i, tok in zip(active, next_ids):
            feed[i] = feed[i][len(step[i]) :]
            if feed[i]:  # still in its prompt: this step's sample is not an output
                still.append(i)
                continue
            out.append((i, tok))
            produced[i] += 1
            if tok not in params.stop_token_ids and produced[i] < params.max_tokens:
                feed[i] = [tok]
                still.append(i)
        active = still
        yield out
