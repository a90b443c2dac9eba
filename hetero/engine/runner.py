"""Runs one scheduled step through the model: builds the paged batch, returns the logits of
every request whose chunk reaches its newest token (nano-vllm's `model_runner`)."""

from __future__ import annotations

import torch

from hetero.engine.scheduler import Work
from hetero.model import ForwardBatch, PagedKVCache, Transformer


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.device = model.lm_head.weight.device

    def batch(self, work: list[Work]) -> tuple[torch.Tensor, ForwardBatch]:
        """input ids [T] and the ForwardBatch of a step's work."""
        ids = [t for w in work for t in w.request.tokens[w.start : w.start + w.n]]
        batch = ForwardBatch.paged(
            [w.request.pages for w in work],
            [w.n for w in work],
            [w.start + w.n for w in work],
            self.cache.page_size,
            self.device,
        )
        return torch.tensor(ids, dtype=torch.long, device=self.device), batch

    def run(self, work: list[Work]) -> torch.Tensor:
        """-> logits [S, V] of the work items that sample, in order."""
        input_ids, batch = self.batch(work)
        logits = self.model(input_ids, batch, self.cache, last_only=True)  # [B, V]
        rows = [i for i, w in enumerate(work) if w.samples]
        if len(rows) == len(work):
            return logits
        return logits[torch.tensor(rows, device=logits.device)]
