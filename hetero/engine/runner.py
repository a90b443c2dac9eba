"""Runs one scheduled step through the model: builds the paged batch, returns the logits of
every request whose chunk reaches its newest token (nano-vllm's `model_runner`).

Decode-only steps of at most `max_graph_batch` requests go through hetero.sched.graphs'
segments (CUDA graphs on a GPU): one GraphedDecoder per (batch bucket, page-table width
bucket), both powers of two, the step's rows padded up to its bucket. Other steps (prompt chunks,
mixed) run the model eagerly."""

from __future__ import annotations

import torch

from hetero.engine.scheduler import Work
from hetero.model import ForwardBatch, PagedKVCache, Transformer
from hetero.sched.graphs import GraphedDecoder
from hetero.sched.hot_experts import HotExperts


def bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        max_model_len: int,
        max_graph_batch: int = 0,
        graphs: bool = True,
        per_request: bool = False,
        hot: HotExperts | None = None,
    ) -> None:
        """`max_graph_batch`: largest decode batch run through graph segments (0: none);
        `graphs`: capture them as CUDA graphs (False: the same segments eagerly, for tests);
        `per_request`: each request its own forward pass (deterministic mode: no op ever mixes
        two requests' tokens, so none depends on what else runs); `hot`: live GPU experts,
        told after each step (when no expert job is in flight)."""
        self.model, self.cache = model, cache
        self.per_request, self.hot = per_request, hot
        self.device = model.lm_head.weight.device
        self.max_graph_batch, self.graphs = max_graph_batch, graphs
        self.decoders: dict[tuple[int, int], GraphedDecoder] = {}
        # rotary tables for the whole context now: a graph must never see them reallocated
        model.model.rotary.tables(torch.zeros(1, dtype=torch.long, device=self.device),
                                  max_model_len)  # fmt: skip

    def batch(self, work: list[Work]) -> tuple[torch.Tensor, ForwardBatch]:
        """input ids [T] and the ForwardBatch of a step's work."""
        ps = self.cache.page_size
        ids = [t for w in work for t in w.request.tokens[w.start : w.start + w.n]]
        batch = ForwardBatch.paged(
            [w.request.pages[: -(-(w.start + w.n) // ps)] for w in work],
            [w.n for w in work],
            [w.start + w.n for w in work],
            ps,
            self.device,
        )
        return torch.tensor(ids, dtype=torch.long, device=self.device), batch

    def run(self, work: list[Work]) -> torch.Tensor:
        """-> logits [S, V] of the work items that sample, in order."""
        if self.per_request and len(work) > 1:
            parts = [self._run([w]) for w in work]  # [1, V] or [0, V] each
            logits = torch.cat(parts)
        else:
            logits = self._run(work)
        if self.hot is not None:
            self.hot.step_done()
        return logits

    def _run(self, work: list[Work]) -> torch.Tensor:
        input_ids, batch = self.batch(work)
        if len(work) <= self.max_graph_batch and batch.is_decode:
            return self._graphed(input_ids, batch)
        logits = self.model(input_ids, batch, self.cache, last_only=True)  # [B, V]
        rows = [i for i, w in enumerate(work) if w.samples]
        if len(rows) == len(work):
            return logits
        return logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]

    def _graphed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n, width = batch.page_table.shape
        key = (bucket(n), bucket(width))
        if key not in self.decoders:
            self.decoders[key] = GraphedDecoder(
                self.model, self.cache, self.graphs, batch=key[0], pages=key[1]
            )
        decoder = self.decoders[key]
        return decoder.paged_step(input_ids, batch.positions, batch.page_table, batch.slot_mapping,
                                  batch.ctx_lens)  # fmt: skip
