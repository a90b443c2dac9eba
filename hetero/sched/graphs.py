"""Decode steps with each layer's GPU work replayed from CUDA graphs.

Eager PyTorch spends ~150 small ops a layer in Python; on the GPU machine that is 3-6 ms a layer
against ~0.15 ms of GPU work (bench/results/2026-11-23-h100x1-hybrid_decode.md). Here, for a
fixed batch of B sequences, each layer is cut where the CPU experts are handed over:

  segment 1 (a graph): the previous layer's residual add and this layer's input norm (one
      kernel on CUDA), MLA attention over the whole cache (masked by position, so shapes never
      change), residual, post-attention norm, and the router (or a dense MLP);
  Python: the routed experts are submitted (CPU engine, GPU-resident experts);
  segment 2 (a graph): the shared experts, while the CPU works;
  Python: the CPU sum, the shared experts and the previous layer's deferred experts are added
      in MoE.forward's order, into the layer's output buffer that the next segment 1 adds to
      its residual.

With `graphs=False` the same segments run eagerly on any device: the tests compare that path to
the plain model on the CPU, and the GPU tests compare the graphs to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hetero.model import ForwardBatch, Transformer
from hetero.model.batch import Cache, PagedKVCache
from hetero.model.moe import finish


class Segment:
    """fn() over static buffers; with graphs, warmed up once on a side stream, then captured and
    replayed (its outputs are the same tensors every time)."""

    def __init__(self, fn: Callable[[], object], graphs: bool, pool) -> None:
        self.fn, self.graphs, self.pool = fn, graphs, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None

    def __call__(self):
        if not self.graphs:
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn()  # allocator and library warm-up before capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self.fn()
        self.graph.replay()
        return self.out


class GraphedDecoder:
    """`step(input_ids [B], positions [B]) -> logits [B, V]`: one decode step of sequences
    0..B-1 of a contiguous `cache` (filled by the model's own prefill), each at `positions[i]`.

    With a PagedKVCache the graphs serve `batch` rows whose page tables are `pages` wide:
    `paged_step` takes each row's page table and new cache row, and rows past its `n` real ones
    are padding (page 0) whose tokens the routed experts never see."""

    def __init__(
        self, model: Transformer, cache: Cache, graphs: bool = True, batch: int = 0, pages: int = 0
    ) -> None:
        self.model, self.cache = model, cache
        device = model.lm_head.weight.device
        # graphs keep the rotary tables' addresses: made whole now, they never move after a
        # capture (grown on demand, a longer prompt would reallocate them under the graphs)
        model.model.rotary.full_tables(model.config.max_position_embeddings, device)
        if isinstance(cache, PagedKVCache):
            B, S = batch, pages * cache.page_size
            table = torch.zeros(B, pages, dtype=torch.int32, device=device)
            rows = torch.zeros(B, dtype=torch.long, device=device)
        else:
            B, S = cache.latent.shape[1], cache.max_len
            table = rows = None
        self.ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        slots = torch.arange(B, device=device)
        # every sequence "as long as the cache" (or its page table): attention reads all S
        # positions, masked by position, so no shape depends on the step
        self.mla_plan = _graph_plan(model, cache, B, pages)  # (flashinfer: planned each step)
        self.batch = ForwardBatch(
            self.positions, slots, tuple(range(B)), (1,) * B, (S,) * B, table, rows, self.mla_plan
        )
        self.n = B  # real rows of the current step
        H, dtype = model.config.hidden_size, model.lm_head.weight.dtype
        layers = model.model.layers
        self.x = [torch.zeros(B, H, dtype=dtype, device=device) for _ in range(2)]  # in, out
        # a layer's residual after attention, and its MLP / MoE output (MoE: this buffer, which
        # the next layer's segment 1 reads): their sum is the next layer's input
        self._xa: list[torch.Tensor | None] = [None] * len(layers)
        self._y = [torch.zeros(B, H, dtype=dtype, device=device) for _ in layers]
        self._r: list[torch.Tensor | None] = [None] * len(layers)
        pool = torch.cuda.graph_pool_handle() if graphs else None
        self.embed = Segment(lambda: model.model.embed_tokens(self.ids), graphs, pool)
        self.attn = [Segment(self._attention(i), graphs, pool) for i in range(len(layers))]
        self.shared = [
            Segment(self._shared(i), graphs, pool) if self._has_shared(i) else None
            for i in range(len(layers))
        ]
        self.head = Segment(
            lambda: model.lm_head(model.model.norm(self.x[-1])).float(), graphs, pool
        )
        self._h: list[torch.Tensor | None] = [None] * len(layers)  # segment 1's norm output

    def _has_shared(self, i: int) -> bool:
        block = self.model.model.layers[i]
        return block.is_moe and block.mlp.shared_experts is not None

    def _attention(self, i: int) -> Callable[[], tuple]:
        block, rotary = self.model.model.layers[i], self.model.model.rotary

        def segment():
            if i == 0:
                x, h = block.attend(self.x[0], self.batch, self.cache, rotary)
            else:
                prev = self._xa[i - 1], self._r[i - 1]
                x, h = block.attend(prev[0], self.batch, self.cache, rotary, r=prev[1])
            if not block.is_moe:
                return x, block.mlp(h)
            weights, ids = block.mlp.gate(h)
            return x, h, weights, ids

        return segment

    def _shared(self, i: int) -> Callable[[], torch.Tensor]:
        moe = self.model.model.layers[i].mlp
        return lambda: moe.shared_experts(self._h[i])

    @torch.inference_mode()
    def paged_step(self, input_ids, positions, page_table, cache_rows, ctx_lens=None):
        """n = len(input_ids) real rows (<= the graphs' batch): ids, positions [n], page table
        [n, <= pages] int32, cache rows [n] -> logits [n, V]. `ctx_lens` [n] (host ints, the
        positions + 1): what an attention backend that plans on the host needs (flashinfer)."""
        n, width = page_table.shape
        self.batch.page_table.zero_()
        self.batch.page_table[:n, :width].copy_(page_table)
        self.batch.slot_mapping.zero_()
        self.batch.slot_mapping[:n].copy_(cache_rows)
        self.ids.zero_()
        self.positions.zero_()
        if self.mla_plan is not None:  # padding rows: one token, in page 0
            if ctx_lens is None:
                raise ValueError("a flashinfer decode step wants the host's context lengths")
            lens = [*ctx_lens, *[1] * (self.batch.page_table.shape[0] - n)]
            a, dtype = self.model.model.layers[0].self_attn, self.cache.latent.dtype
            self.mla_plan.plan(self.batch, self.cache.page_size, a.n_heads, a.kv_rank,
                               a.rope_dim, a.softmax_scale, dtype, lens)  # fmt: skip
        return self.step(input_ids, positions)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = self.n = input_ids.shape[0]
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.x[0].copy_(self.embed())
        pending = None
        for i, block in enumerate(self.model.model.layers):
            out = self.attn[i]()
            self._xa[i] = out[0]
            if not block.is_moe:
                self._r[i] = out[1]
                continue
            x, h, weights, ids = out
            self._h[i] = h
            full = n == x.shape[0]  # no padding rows (no slicing: views cost Python)
            rows = (h, ids, weights) if full else (h[:n], ids[:n], weights[:n])
            run = block.mlp.routed.submit(*rows)  # CPU experts start here
            shared = self.shared[i]() if self.shared[i] is not None else None
            y = self._r[i] = self._y[i]
            if not full:  # padding rows skip the MoE: nothing to add
                shared = shared[:n] if shared is not None else None
                y[n:].zero_()
                y = y[:n]
            _, pending = finish(run, shared, pending, out=y)
        torch.add(self._xa[-1], self._r[-1], out=self.x[-1])
        if pending is not None:
            self.x[-1][:n].add_(pending.result())
        return self.head()[:n].clone()


def _graph_plan(model: Transformer, cache: Cache, batch: int, pages: int):
    """flashinfer's plan with buffers fixed for this decoder's graphs, where its kernel runs
    the decode steps (`flashinfer_mla.decodes`); else None."""
    from hetero.model.attention import flashinfer_attention

    layers = model.model.layers
    if not (len(layers) and layers[0].self_attn.attend is flashinfer_attention):
        return None
    from hetero.gpu.flashinfer_mla import FlashInferMLA, applies, decodes, shared_workspace

    # (the graphs' static batch: every row as long as its page table, as attention sees it)
    if not applies(cache):  # (a contiguous cache has no pages)
        return None
    if not decodes(layers[0].self_attn.backend, cache, batch, pages * cache.page_size):
        return None
    workspace = shared_workspace(cache.state, cache.latent.device)  # one for all its decoders
    return FlashInferMLA(workspace, graph_batch=batch, graph_pages=pages)
