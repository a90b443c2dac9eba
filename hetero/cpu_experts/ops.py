"""Launchers: check and prepare arguments, allocate outputs, call the raw kernels of kernels.py."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

from hetero.cpu_experts import amx, fused, kernels, kernels_amx, kernels_amx_bf16, kernels_q8
from hetero.cpu_experts.formats import PackedExperts, as_tensor


class Grouping(NamedTuple):
    """The (token, slot) pairs of a call, sorted by expert (see kernels.group_by_expert)."""

    experts: np.ndarray  # [A] active expert ids
    ptr: np.ndarray  # [A + 1] pair range of each
    pair_token: np.ndarray  # [P]
    pair_slot: np.ndarray  # [P]
    pos: np.ndarray  # [T, k] pair of each slot, -1 where skipped

    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)  # [A] tokens per active expert


def group_by_expert(ids: np.ndarray, num_experts: int) -> Grouping:
    return Grouping(*kernels.group_by_expert(_checked_ids(ids, num_experts), num_experts))


def _checked_ids(ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.size and ids.max() >= num_experts:
        raise ValueError(f"expert id {ids.max()} out of range for {num_experts} experts")
    return ids


def _check(layer: PackedExperts, x: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    T, H = x.shape
    if H != layer.hidden or out.shape != (T, H):
        raise ValueError(f"x {x.shape} / out {out.shape} do not match hidden size {layer.hidden}")
    if x.dtype != np.float32 or weights.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("x and weights must be contiguous float32")


def _q8_offset(layer: PackedExperts, int8_activations: bool) -> int | None:
    """The weights' unsigned offset when the layer runs on int8 activations, else None."""
    if not (int8_activations and q8_activations(layer)):
        return None
    return 8 if layer.fmt.name == "int4" else 128


def q8_activations(layer: PackedExperts) -> bool:
    """Layers whose format and sizes allow it run on int8 activations (kernels_q8): int4 with
    groups up to 128, int8 with a scale per row or per 128; H and I multiples of 128."""
    G, sizes = layer.fmt.group_size, (layer.hidden, layer.inter)
    if not all(n % kernels_q8.BLOCK == 0 for n in sizes):
        return False
    if layer.fmt.name == "int4":
        return G <= kernels_q8.BLOCK
    return layer.fmt.name == "int8" and G in (0, kernels_q8.BLOCK)


def moe_gemv(
    layer: PackedExperts,
    x: np.ndarray,
    weights: np.ndarray,
    g: Grouping,
    out: np.ndarray,
    rows_per_item: int = 16,
    int8_activations: bool = True,
    prefetch_bytes: int = 0,
) -> None:
    """out [T, H] = the routed experts of `g` applied to x [T, H] (GEMV kernel, all in numba).

    With `int8_activations`, layers `q8_activations` accepts quantize the activations to int8
    first (kernels_q8)."""
    _check(layer, x, weights, out)
    offset = _q8_offset(layer, int8_activations)
    if offset is not None:
        y = np.empty((g.pair_token.shape[0], layer.hidden), np.float32)  # [P, H]
        kernels_q8.moe_gemv_q8(
            x, weights, g.experts, g.ptr, g.pair_token, g.pair_slot,
            layer.w13, layer.s13, layer.w2, layer.s2, y, rows_per_item, offset, prefetch_bytes,
            numba.get_num_threads(),
        )  # fmt: skip
        kernels.combine(g.pos, y, out)
        return
    kernels.moe_gemv(
        x,
        weights,
        g.experts,
        g.ptr,
        g.pair_token,
        g.pair_slot,
        g.pos,
        layer.w13,
        layer.s13,
        layer.w2,
        layer.s2,
        out,
        rows_per_item,
    )


def moe_layer(
    layer: PackedExperts,
    x: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    rows: np.ndarray,
    deferred: int,
    outs: np.ndarray,
    done: np.ndarray,
    rows_per_item: int = 16,
    int8_activations: bool = True,
    prefetch_bytes: int = 0,
    ready: np.ndarray | None = None,
    max_wait_cycles: int = 1 << 40,
) -> int:
    """`group_by_expert` + `moe_gemv` in one numba call (fused.py: the GIL is taken back once),
    part by part (kernels.split_parts of ids [T, k] by `rows` [E] and `deferred`): outs[p]
    [T, H] = the experts of part p, weighted by weights [T, k], applied to x [T, H]; done[p]
    (int64) goes up by one once outs[p] is written. `ready` int64 [1]: the kernel first waits
    (spinning, at most `max_wait_cycles` of the CPU's cycle counter) until ready[0] != 0, for
    inputs still being copied in; None: they are there. Returns the cycles it waited."""
    n = 2 if deferred else 1
    _check(layer, x, weights, outs[0])
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != weights.shape or outs.shape != (n, *x.shape) or done.shape != (n,):
        raise ValueError(
            f"ids {ids.shape}, weights {weights.shape}, outs {outs.shape}, done {done.shape}"
            f" do not fit x {x.shape} and {n} part(s)"
        )
    if done.dtype != np.int64 or not outs.flags.c_contiguous:
        raise ValueError("done must be int64, outs contiguous")
    if ready is None:
        ready = np.ones(1, np.int64)
    if ready[0] and ids.size and ids.max() >= rows.shape[0]:  # (in flight: the kernel checks)
        raise ValueError(f"expert id {ids.max()} out of range for {rows.shape[0]} experts")
    check_rows(rows, layer.num_experts)
    args = (x, ids, weights, rows, deferred, layer.num_experts)
    args += (layer.w13, layer.s13, layer.w2, layer.s2, outs, done, rows_per_item)
    offset = _q8_offset(layer, int8_activations)
    if offset is not None:
        threads = numba.get_num_threads()  # (as an argument: the kernels stay cacheable)
        stamps = np.zeros(3, np.int64)
        waited = fused.moe_layer_q8(
            *args, offset, prefetch_bytes, threads, ready, max_wait_cycles, stamps
        )
    else:
        waited = fused.moe_layer(*args, ready, max_wait_cycles)
    return _arrived(waited, max_wait_cycles)


def wait_inputs(ready: np.ndarray, max_wait_cycles: int) -> int:
    """Spins, without the GIL, until ready[0] != 0 (see `moe_layer`); the cycles it waited."""
    return _arrived(fused.wait_inputs(ready, max_wait_cycles), max_wait_cycles)


def _arrived(waited: int, max_wait_cycles: int) -> int:
    if waited < 0:
        raise RuntimeError(f"a CPU expert job's inputs did not arrive ({max_wait_cycles} cycles)")
    return waited


def check_rows(rows: np.ndarray, num_experts: int) -> None:
    """rows [E]: an engine row (< num_experts) or -1 for each expert id."""
    if rows.dtype != np.int64 or rows.ndim != 1 or (rows.size and rows.max() >= num_experts):
        top = rows.max() if rows.size else None
        raise ValueError(
            f"rows must be int64 [E] with engine rows below {num_experts} (got {rows.dtype} "
            f"{rows.shape}, max {top})"
        )


def amx_ok(layer: PackedExperts) -> bool:
    """Layers `moe_gemm_amx` takes: int4 and int8 with H and I multiples of 128 (any group)."""
    sizes = (layer.hidden, layer.inter)
    return layer.fmt.name in ("int4", "int8") and all(n % kernels_amx.BLOCK == 0 for n in sizes)


def moe_gemm_amx(
    layer: PackedExperts,
    x: np.ndarray,
    weights: np.ndarray,
    g: Grouping,
    out: np.ndarray,
    scratch: dict[str, np.ndarray] | None = None,
    prefetch_bytes: int = 16384,
    times: dict[str, float] | None = None,
    int4_tiles: str = "auto",
    bf16_order: str = "1x4",
) -> None:
    """out [T, H] += the routed experts of `g` applied to x [T, H], on AMX tiles (kernels_amx;
    an exact emulation where the CPU has no AMX: tests only). For experts with many tokens.
    `int4_tiles`: int4 layers on "bf16" tiles (kernels_amx_bf16), "int8" ones, or "auto": bf16
    for group 32 (rescaling int8 sums every 32 k costs more than dequantizing), int8 above.
    `scratch`: buffers kept between calls (a 1024-token V3 call uses ~400 MB of them, whose
    first touch would cost tens of ms a call). `prefetch_bytes`: how far ahead each weight row
    is prefetched (at most a row: past its end, the thread's next item; 0: none); `times`:
    filled with each step's seconds; `bf16_order`: the order of tile loads and products on bf16
    tiles (kernels_amx_bf16.ORDERS)."""
    scratch = {} if scratch is None else scratch
    _check(layer, x, weights, out)
    if int4_tiles not in ("auto", "bf16", "int8"):
        raise ValueError(f"int4_tiles must be auto, bf16 or int8, not {int4_tiles!r}")
    if bf16_order not in kernels_amx_bf16.ORDERS:
        orders = ", ".join(kernels_amx_bf16.ORDERS)
        raise ValueError(f"bf16_order must be one of {orders}, not {bf16_order!r}")
    if not amx_ok(layer):
        raise ValueError(f"the AMX path takes int4/int8 layers with H, I % 128 == 0, not {layer}")
    amx.enable()
    H, I, A = layer.hidden, layer.inter, g.experts.shape[0]
    if A == 0:
        return
    clock = _Clock(times)
    TM = kernels_amx.TM
    tiles = -(-g.counts() // TM)  # [A] token tiles of each expert
    first = np.concatenate([[0], np.cumsum(tiles)]).astype(np.int64)  # [A + 1]
    U = int(first[-1])
    pairs = np.full((U, TM), -1, np.int64)  # [U, 16] pair of each token column
    a_of = np.repeat(np.arange(A), g.counts())  # [P]
    local = np.arange(g.pair_token.shape[0]) - g.ptr[a_of]
    pairs.reshape(-1)[first[a_of] * TM + local] = np.arange(local.shape[0])
    tokens = np.where(pairs >= 0, g.pair_token[np.maximum(pairs, 0)], -1)  # [U, 16]
    scale = np.ascontiguousarray(weights[g.pair_token, g.pair_slot], np.float32)  # [P]
    offset = 8 if layer.fmt.name == "int4" else 0
    threads = numba.get_num_threads()
    G13, G2 = layer.fmt.group(H), layer.fmt.group(I)
    clock.lap("plan")
    if int4_tiles == "auto":
        int4_tiles = "bf16" if G13 == 32 else "int8"
    if layer.fmt.name == "int4" and int4_tiles == "bf16":
        y = _bf16_tile_experts(layer, x, g, first, tokens, pairs, scale, scratch,
                               prefetch_bytes, clock, bf16_order)  # fmt: skip
        kernels.combine(g.pos, y, out, add=True)
        clock.lap("add")
        return
    xb, xs, xsum = _b_tiles(x, tokens, G13, scratch, "x")
    h = _scratch(scratch, "h", (U, TM, I), np.float32)
    clock.lap("quantize_x")
    flat = (a.reshape(-1) for a in (layer.w13, layer.s13))
    kernels_amx.gate_up(*flat, H, I, G13, offset, _config(G13), g.experts, first, xb.reshape(-1),
                        xs, xsum, h, prefetch_bytes, threads)  # fmt: skip
    clock.lap("gate_up")
    columns = np.where(pairs >= 0, np.arange(U * TM).reshape(U, -1), -1)
    hb, hs, hsum = _b_tiles(h.reshape(U * TM, I), columns, G2, scratch, "h")
    y = _scratch(scratch, "y", (g.pair_token.shape[0], H), np.float32)
    clock.lap("quantize_h")
    flat = (a.reshape(-1) for a in (layer.w2, layer.s2))
    kernels_amx.down(*flat, H, I, G2, offset, _config(G2), g.experts, first, hb.reshape(-1), hs,
                     hsum, pairs, scale, y, prefetch_bytes, threads)  # fmt: skip
    clock.lap("down")
    kernels.combine(g.pos, y, out, add=True)
    clock.lap("add")


def _bf16_tile_experts(layer, x, g, first, tokens, pairs, scale, scratch, prefetch_bytes, clock,
                       order):  # fmt: skip
    """y [P, H]: each pair's expert output times its router weight, on bf16 tiles in `order`
    (kernels_amx_bf16.ORDERS; 1x4 where the matrix's rows are not a whole number of items)."""
    H, I, TM = layer.hidden, layer.inter, kernels_amx.TM
    U, threads = tokens.shape[0], numba.get_num_threads()
    G13, G2 = layer.fmt.group(H), layer.fmt.group(I)
    TK, cfg = kernels_amx_bf16.TK, kernels_amx_bf16.tile_config()
    xb = _scratch(scratch, "xb16", (U, H // TK, TK // 2, 2 * TM), np.uint16)
    kernels_amx_bf16.pack_tiles(x, tokens, xb)
    h = _scratch(scratch, "h", (U, TM, I), np.float32)
    clock.lap("quantize_x")
    code = kernels_amx_bf16.ORDERS.index(order)  # (1x4 where rows are not whole items)
    rows_of = kernels_amx_bf16.SLABS[code] * TM
    order13, order2 = (code if rows % rows_of == 0 else 0 for rows in (2 * I, H))
    flat = (a.reshape(-1) for a in (layer.w13, layer.s13))
    kernels_amx_bf16.gate_up(*flat, H, I, G13, cfg, g.experts, first, xb.reshape(-1), h,
                             prefetch_bytes, threads, order13)  # fmt: skip
    clock.lap("gate_up")
    columns = np.where(pairs >= 0, np.arange(U * TM).reshape(U, -1), -1)
    hb = _scratch(scratch, "hb16", (U, I // TK, TK // 2, 2 * TM), np.uint16)
    kernels_amx_bf16.pack_tiles(h.reshape(U * TM, I), columns, hb)
    y = _scratch(scratch, "y", (g.pair_token.shape[0], H), np.float32)
    clock.lap("quantize_h")
    flat = (a.reshape(-1) for a in (layer.w2, layer.s2))
    kernels_amx_bf16.down(*flat, H, I, G2, cfg, g.experts, first, hb.reshape(-1), pairs, scale,
                          y, prefetch_bytes, threads, order2)  # fmt: skip
    clock.lap("down")
    return y


class _Clock:
    """Adds each lap's seconds to times[name] (nothing if times is None)."""

    def __init__(self, times: dict[str, float] | None) -> None:
        self.times, self.t = times, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.times is not None:
            now = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + now - self.t
            self.t = now


def _config(G: int) -> np.ndarray:
    return kernels_amx.tile_config(kernels_amx.tile_k(G)[0])


def _b_tiles(
    src: np.ndarray, index: np.ndarray, G: int, scratch: dict[str, np.ndarray], name: str
) -> tuple[np.ndarray, ...]:
    """kernels_amx.quantize_tiles of the rows index [U, 16] of src [N, K] (-1: zeros)."""
    (U, _), K = index.shape, src.shape[1]
    kt, rr = kernels_amx.tile_k(G)
    xb = _scratch(scratch, name + "b", (U, K // kt, kt // 4, 64), np.int8)
    xs = _scratch(scratch, name + "s", (U, K // kernels_amx.BLOCK, kernels_amx.TM), np.float32)
    xsum = _scratch(scratch, name + "sum", (U, K // rr, kernels_amx.TM), np.int32)
    kernels_amx.quantize_tiles(src, index, kt, rr, xb, xs, xsum)
    return xb, xs, xsum


def _scratch(scratch: dict[str, np.ndarray], name: str, shape: tuple, dtype) -> np.ndarray:
    """An uninitialized array of this shape from scratch[name], grown (x1.5) when too small."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    if name not in scratch or scratch[name].nbytes < n:
        scratch[name] = np.empty(n * 3 // 2 if name in scratch else n, np.uint8)
    return scratch[name][:n].view(dtype).reshape(shape)


class DequantBuffers(NamedTuple):
    """Scratch for one expert's weights in bf16, reused by every GEMM-path expert of a call."""

    w13: np.ndarray  # uint16 [2I, H]
    w2: np.ndarray  # uint16 [H, I]

    @classmethod
    def for_layer(cls, layer: PackedExperts) -> DequantBuffers:
        H, I = layer.hidden, layer.inter
        return cls(np.empty((2 * I, H), np.uint16), np.empty((H, I), np.uint16))


def expert_gemm(layer: PackedExperts, e: int, x: torch.Tensor, buf: DequantBuffers) -> torch.Tensor:
    """One expert on many tokens, x [n, H] fp32 -> [n, H] fp32, through oneDNN (AMX where the CPU
    has it). Per-row int8 weights go straight into int8 x int8 -> int32 matmuls on per-token
    int8 activations; other formats are first dequantized to bf16 (once per call)."""
    if layer.fmt.name == "int8" and layer.fmt.group_size == 0:
        return _int8_gemm(layer, e, x)
    return _bf16_gemm(layer, e, x.bfloat16(), buf)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x [n, K] fp32 -> (int8 [n, K], scale [n, 1])."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().to(torch.int8), scale


def _int8_gemm(layer: PackedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    I = layer.inter
    w13 = as_tensor(layer.w13[e]).view(2 * I, -1)  # [2I, H] int8
    s13 = as_tensor(layer.s13[e]).view(1, 2 * I)
    n = x.shape[0]
    xq, xs = _quantize_rows(_pad_rows(x))  # oneDNN's int8 matmul wants a few rows at least
    gu = (torch._int_mm(xq, w13.T)[:n].float() * xs[:n] * s13).view(n, I, 2)
    h = F.silu(gu[..., 0]) * gu[..., 1]  # [n, I]
    hq, hs = _quantize_rows(_pad_rows(h))
    w2 = as_tensor(layer.w2[e])  # [H, I] int8
    return torch._int_mm(hq, w2.T)[:n].float() * hs[:n] * as_tensor(layer.s2[e]).view(1, -1)


def _pad_rows(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    pad = -x.shape[0] % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _bf16_gemm(layer: PackedExperts, e: int, x: torch.Tensor, buf: DequantBuffers) -> torch.Tensor:
    I = layer.inter
    w13, w2 = layer.w13[e].reshape(2 * I, -1), layer.w2[e]  # [2I, .], [H, .]
    if layer.fmt.name != "bf16":  # bf16 weights are used in place
        kernels.dequantize_rows(w13, layer.s13[e].reshape(2 * I, -1), buf.w13)
        kernels.dequantize_rows(w2, layer.s2[e], buf.w2)
        w13, w2 = buf.w13, buf.w2
    gu = (x @ as_tensor(w13).T).view(-1, I, 2)  # [n, I, 2]: rows alternate gate, up
    h = F.silu(gu[..., 0]) * gu[..., 1]  # [n, I]
    return (h @ as_tensor(w2).T).float()
