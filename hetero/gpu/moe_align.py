"""Token sorting for the fused MoE ("moe align", as in vLLM and SGLang): the (token, slot) pairs
of a batch grouped by the local expert they chose, each expert's group padded to a multiple of
BLOCK_M, so that every BLOCK_M rows of the sorted order belong to one expert and a GEMM program
can own them with that expert's weight.

Torch ops only, and none reads a value back to the host (no .item(), no boolean indexing): the
sizes are the static bound R = T*k + min(n, T*k) * (BLOCK_M - 1), rounded up to BLOCK_M, so the
work can be captured in a CUDA graph. Blocks past the used rows get expert -1 (their programs
return at once)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Aligned(NamedTuple):
    pairs: torch.Tensor  # [R] int32: pair t*k + j in sorted order; T*k marks padding
    block_expert: torch.Tensor  # [R / BLOCK_M] int32: each block's stack index, -1: unused


def moe_align(ids: torch.Tensor, local: torch.Tensor, n: int, block_m: int) -> Aligned:
    """ids [T, k] (expert ids; < 0: computed elsewhere), local [E] (expert id -> stack index in
    0..n-1, -1: not on this device) -> the local pairs sorted by stack index, padded per expert.
    Pairs whose expert is not local appear nowhere. Ids must be < E (not checked: a sync)."""
    T, k = ids.shape
    P = T * k
    dev = ids.device
    R = -(-(P + min(n, P) * (block_m - 1)) // block_m) * block_m
    e = local[ids.clamp_min(0).long()].long().masked_fill(ids < 0, -1).view(P)  # [P]
    key = torch.where(e < 0, n, e)  # not here: a bucket past the last expert
    counts = torch.zeros(n + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))  # [n + 1]
    padded = (counts[:n] + block_m - 1) // block_m * block_m  # [n]
    ends = padded.cumsum(0)  # [n] where each expert's rows end in the sorted order
    order = torch.sort(key, stable=True).indices  # [P] pairs grouped by key, in pair order
    skey = key[order]  # [P]
    first = counts.cumsum(0) - counts  # [n + 1] where each key's pairs begin in `order`
    rank = torch.arange(P, device=dev) - first[skey]  # [P] a pair's place in its expert's rows
    here = skey < n
    start = (ends - padded)[skey.clamp_max(n - 1)]  # [P]
    dest = torch.where(here, start + rank, R)  # row R: a trash row for pairs not here
    pairs = torch.full((R + 1,), P, dtype=torch.long, device=dev).scatter_(0, dest, order)
    block_start = torch.arange(0, R, block_m, device=dev)  # [R / BLOCK_M]
    # a block's expert: how many experts' rows end at or before its first row
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = block_expert.masked_fill(block_expert >= n, -1)
    return Aligned(pairs[:R].int(), block_expert.int())


def on_local_pairs(
    moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, local: torch.Tensor
) -> torch.Tensor:
    """A fused MoE over the local (token, slot) pairs only, for prefill (two host syncs, both
    before the kernels are queued: the pair list and each slot's count; never in a CUDA
    graph): x [T, H], ids/weights [T, k]; `moe(xs [P, H], ids [P, 1], weights [P, 1]) -> [P, H]
    fp32` (each pair's weighted expert output) -> the sum [T, H] fp32. The kernel's buffers
    then scale with the local pairs, not with T x k (most of a chunk's pairs choose experts
    elsewhere); the sums go in a slot at a time, so no index_add_ meets a token twice and the
    order of the additions is fixed."""
    T, k = ids.shape
    mine = (ids >= 0) & (local[ids.clamp_min(0).long()] >= 0)  # [T, k]
    pairs = mine.flatten().nonzero().squeeze(1)  # [P] pair t*k + slot
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    if pairs.numel() == 0:
        return out
    tok, slot = pairs // k, pairs % k  # [P] each
    order = torch.argsort(slot, stable=True)  # [P] by slot, each slot's pairs in token order
    counts = torch.bincount(slot, minlength=k).tolist()  # (read before the kernels are queued)
    y = moe(x[tok], ids.flatten()[pairs][:, None], weights.flatten()[pairs][:, None])  # [P, H]
    for at in torch.split(order, counts):  # a slot at a time: no token twice in one index_add_
        out.index_add_(0, tok[at], y[at])
    return out
