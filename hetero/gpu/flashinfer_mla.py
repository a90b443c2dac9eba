"""MLA decode through flashinfer's paged MLA kernel (`BatchMLAPagedAttentionWrapper`: on Hopper
its FA3-based kernel), over the engine's paged latent cache as it is: flashinfer's
ckv_cache [pages, page_size, kv_rank] and kpe_cache [pages, page_size, rope] are a layer's
`PagedKVCache.latent` and `.rope`. flashinfer is optional (`pip install flashinfer-python`);
`--attention flashinfer` asks for it wherever it applies; `auto` (the default) takes it where
it measured faster than the Triton kernel (`pays`) when it is installed; `triton` needs
nothing more.

A step is planned once (the work split over the batch's context lengths, on the host) and run
in every layer: `FlashInferMLA.plan(batch)` when the batch changes, `run` a layer. Extend
steps (prompt chunks) run through it too with `--attention flashinfer`: their sequences of
fewer than MHA_MIN_TOKENS new tokens, causally (`auto` keeps the Triton kernel there until it
is measured); longer ones decompress K/V for flash attention as "triton" does."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

WORKSPACE_BYTES = 128 << 20  # flashinfer's float workspace (its examples' size)
MISSING = (
    "attention 'flashinfer' needs the flashinfer package (pip install flashinfer-python, "
    "0.5.3 tested; it compiles its kernels with nvcc on first use); 'triton' needs nothing more"
)


def available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def applies(cache) -> bool:
    """Whether flashinfer's kernel decodes over `cache`: a 16-bit PagedKVCache on CUDA."""
    from hetero.model.batch import PagedKVCache

    return (
        isinstance(cache, PagedKVCache)
        and cache.latent.is_cuda
        and cache.latent.dtype in (torch.bfloat16, torch.float16)
    )


def pays(rows: int, longest: int) -> bool:
    """Whether flashinfer's decode measured faster than mla_decode's for `rows` sequences, the
    longest `longest` tokens: from 8 rows of 4K tokens. H200, V3's GPU side graphed, ms a step
    (2026-12-04): 1 x 16 10.77 against 9.99 (triton), 4 x 4K 12.90 / 12.58, 8 x 4K 13.52 /
    13.90, 16 x 4K 14.95 / 16.39, 32 x 4K 19.12 / 22.23. (The kernel alone leads further: 78
    against 182 us at 32 x 4K; below, its plan and fixed costs outweigh it.)"""
    return rows >= 8 and longest >= 4096


def decodes(backend: str, cache, rows: int, longest: int) -> bool:
    """The one condition the attention and the graphs' plan ask: whether flashinfer's kernel
    runs a decode step of `rows` sequences over `cache`. "flashinfer": wherever it `applies`;
    "auto" (resolved to flashinfer at load only when installed): where it also `pays`."""
    return applies(cache) and (backend == "flashinfer" or pays(rows, longest))


def shared_workspace(state: dict, device: torch.device) -> torch.Tensor:
    """The float scratch kept in `state` (a cache's backend state), made on first use: every
    plan over one cache shares it (their steps never overlap)."""
    if "flashinfer_workspace" not in state:
        state["flashinfer_workspace"] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8,
                                                    device=device)  # fmt: skip
    return state["flashinfer_workspace"]


def page_indices(
    page_table: torch.Tensor,
    ctx_lens: list[int] | tuple[int, ...],
    page_size: int,
    memo: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our [B, P] int32 page table -> flashinfer's CSR form: kv_indptr [B + 1] int32 on the
    host (where its plan reads it) and kv_indices (the pages each sequence's context uses,
    sequence after sequence) int32 on the table's device, gathered there from the table as it
    is now. `memo`: keeps the gather's positions while each row's page count stays (decode
    steps: 63 of 64 with pages of 64), so a step plans without rebuilding them (~70 us)."""
    B, P = page_table.shape
    need = [-(-n // page_size) for n in ctx_lens]  # [B] pages a row
    if len(need) != B or (B and max(need) > P):
        raise ValueError(f"page table {(B, P)} does not hold contexts {list(ctx_lens)} in "
                         f"pages of {page_size}")  # fmt: skip
    key = (tuple(need), P, page_table.device)
    if memo is None or memo.get("key") != key:
        counts = np.asarray(need, dtype=np.int64)
        indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        rows = np.repeat(np.arange(B), counts)  # [pages used]
        cols = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)
        flat = torch.from_numpy(rows * P + cols).to(page_table.device)
        entry = {"key": key, "indptr": torch.from_numpy(indptr.astype(np.int32)), "flat": flat}
        memo = entry if memo is None else memo
        memo.update(entry)
    return memo["indptr"], page_table.reshape(-1)[memo["flat"]].to(torch.int32)


class FlashInferMLA:
    """One plan a step, shared by every layer: call `plan` with the step's batch (a no-op when
    it is the batch planned last), then `run` per layer. `graph_batch` rows of `graph_pages`
    pages: the plan's buffers fixed for CUDA graphs (flashinfer's use_cuda_graph), planned
    again before each replay."""

    def __init__(self, workspace: torch.Tensor, graph_batch: int = 0, graph_pages: int = 0) -> None:
        """`workspace`: flashinfer's float scratch (`shared_workspace`: plans that never run at
        once share one)."""
        if not available():
            raise RuntimeError(MISSING)
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        device = workspace.device
        if graph_batch:
            B, i32 = graph_batch, {"dtype": torch.int32, "device": device}
            self.wrapper = BatchMLAPagedAttentionWrapper(
                workspace, use_cuda_graph=True, qo_indptr=torch.zeros(B + 1, **i32),
                kv_indptr=torch.zeros(B + 1, **i32), kv_indices=torch.zeros(B * graph_pages, **i32),
                kv_len_arr=torch.zeros(B, **i32),
            )  # fmt: skip
        else:
            self.wrapper = BatchMLAPagedAttentionWrapper(workspace)
        self.planned = None  # (batch, subset) the plan is for
        self.memo: dict = {}  # page_indices' gather positions, while the page counts stay
        self.copied = None  # a CUDA event after the last plan's copy to the device (see plan)

    def plan(self, batch, page_size: int, heads: int, kv_rank: int, rope: int, scale: float,
             dtype: torch.dtype, ctx_lens=None, subset=None) -> None:  # fmt: skip
        """`ctx_lens`: the contexts to plan for where the batch's own are not the real ones (a
        graph's static batch claims its whole page table a row); planned every call then.
        `subset`: these sequences of the batch only (an extend step's short ones, in order).
        A sequence's q_lens[i] new tokens are the last of its context: masked causally,
        aligned bottom-right."""
        subset = None if subset is None else tuple(subset)
        last = self.planned or (None, None)
        if ctx_lens is None and last[0] is batch and last[1] == subset:
            return
        ctx_lens = batch.ctx_lens if ctx_lens is None else ctx_lens
        table, q_lens = batch.page_table, batch.q_lens
        if subset is not None:
            ctx_lens, q_lens = [ctx_lens[i] for i in subset], [q_lens[i] for i in subset]
            table = table[torch.tensor(subset, device=table.device)]
        kv_indptr, kv_indices = page_indices(table, ctx_lens, page_size, self.memo)
        q_indptr = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
        lens = torch.tensor(ctx_lens, dtype=torch.int32)
        causal = any(q > 1 for q in q_lens)  # (one new token a row: no mask to apply)
        # indptrs and lengths from the host (flashinfer plans there; it copies them over)
        # flashinfer writes a plan into one page-locked buffer and copies it to the device
        # asynchronously: a plan made while the last one's copy still waits in the stream (the
        # host running ahead of the GPU, no sync between two steps) would overwrite it
        if self.copied is not None:
            self.copied.synchronize()
        self.wrapper.plan(q_indptr, kv_indptr, kv_indices, lens, heads, kv_rank, rope,
                          page_size, causal, scale, dtype, dtype)  # fmt: skip
        if kv_indices.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        self.planned = (batch, subset)  # (the batch held: no other can take its identity)

    def run(self, q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
            rope: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """q_lat [T, h, kv_rank], q_pe [T, h, rope] (rotated), one layer's pages -> out_lat
        [T, h, kv_rank] in q_lat's dtype."""
        return self.wrapper.run(q_lat.contiguous(), q_pe.contiguous(), latent, rope)
