"""Long prefill: a MoE layer's CPU experts computed on the GPU instead, their packed bytes sent
over PCIe in groups through bounded double-buffered staging (hetero.cpu_experts.staging).

Only the experts the chunk routes to cross. While group g computes, group g+1 copies (queued
first: g's compute syncs the host for its pair lists) and the engine's threads gather group g+2
into the host slot g's copy has left, so the gather (host RAM -> pinned), the copy (pinned ->
GPU) and the compute overlap; a group's compute reads the packed bytes as they are
(fused_moe_int4 / fused_moe_int8 on CUDA; each expert dequantized otherwise, the
reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hetero.cpu_experts.engine import CPUExperts
from hetero.cpu_experts.formats import PackedExperts
from hetero.cpu_experts.staging import GroupStaging, group_rows

F32 = torch.float32


def stream_experts(
    engine: CPUExperts,
    staging: GroupStaging,
    layer: int,
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    after_fills: Callable[[], None] | None = None,
) -> torch.Tensor:
    """x [T, H], rows/weights [T, k] (the engine's rows of layer `layer`, -1: computed
    elsewhere) -> the sum of those experts [T, H] in x's dtype, computed on x's device.
    `after_fills`: called once every group's gather is queued on the engine's worker (a split
    chunk queues its CPU job there: it runs after the gathers, beside the GPU's compute)."""
    packed = engine.layers[layer]
    used = torch.unique(rows[rows >= 0]).cpu().numpy()  # (a host sync: prefill only)
    groups = group_rows(used, packed.expert_bytes(), staging.slot_bytes)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if not groups:
        if after_fills is not None:
            after_fills()
        return y.to(x.dtype)
    local = torch.full((packed.num_experts,), -1, dtype=torch.int32, device=x.device)  # [E]

    def fill(i: int):  # group i's gather into host slot i % 2, on the engine's worker
        filled = engine.on_worker(staging.fill, i % 2, packed, groups[i])
        if i == len(groups) - 1 and after_fills is not None:
            after_fills()
        return filled

    group = fill(0).result()
    arrays = staging.to_device(group)
    filled = fill(1) if len(groups) > 1 else None
    for g in range(len(groups)):
        if g + 1 < len(groups):  # group g+1's copy queued before g's compute, whose pair
            # lists sync the host: the copy engine never waits for the host between groups
            nxt = filled.result()
            nxt_arrays = staging.to_device(nxt)
            if g + 2 < len(groups):  # into g's host slot, once g's copy has left it
                filled = fill(g + 2)
        staging.ready(group)
        local.fill_(-1)
        rows_g = torch.from_numpy(group.rows)  # (pinned: its copy does not wait for the stream)
        rows_g = rows_g.pin_memory() if x.is_cuda else rows_g
        local[rows_g.to(x.device, non_blocking=True)] = torch.arange(
            len(group.rows), dtype=torch.int32, device=x.device
        )
        y += group_experts(packed, x, rows, weights, local, arrays)
        staging.release(group)
        if g + 1 < len(groups):
            group, arrays = nxt, nxt_arrays
    return y.to(x.dtype)


def group_experts(
    packed: PackedExperts,
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    local: torch.Tensor,
    arrays: list[torch.Tensor],
) -> torch.Tensor:
    """One staged group: `local` [E] maps the layer's rows to the group's (-1: not in it);
    arrays: the group's w13, s13, w2, s2 on x's device -> their sum [T, H] fp32."""
    fmt = packed.fmt
    if x.is_cuda and fused_format(fmt.name, fmt.group_size):
        return fused_group(fmt, x, rows, weights, local, arrays)
    from hetero.sched.hybrid import dequantized_experts

    in_group = local[rows.clamp_min(0)].long().masked_fill(rows < 0, -1)  # [T, k]
    return dequantized_experts(packed, x, in_group, weights, arrays).float()


def fused_format(name: str, group: int) -> bool:
    """Packed formats the fused kernels compute from (hetero.gpu.fused_moe)."""
    return name == "int4" or (name == "int8" and group in (0, 128))


def fused_group(fmt, x, rows, weights, local, arrays) -> torch.Tensor:
    """The fused kernel on the group's own (token, slot) pairs (moe_align.on_local_pairs): a
    chunk of 32K tokens crosses in ~12 groups a layer, and each group's kernel buffers scale
    with its pairs, not with T x k. -> [T, H] fp32."""
    from hetero.gpu.fused_moe import fused_moe_int4, fused_moe_int8  # triton: where it runs
    from hetero.gpu.moe_align import on_local_pairs

    def moe(xs, ids, w):
        if fmt.name == "int4":
            return fused_moe_int4(xs, ids, w, local, *arrays, fmt.group_size, out_dtype=F32)
        return fused_moe_int8(xs, ids, w, local, *arrays, out_dtype=F32)

    return on_local_pairs(moe, x, rows, weights, local)
