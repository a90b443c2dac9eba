"""The GEMM path of the routed experts on AMX tiles: experts with many tokens (prefill).

Why: at 1024 tokens a V3 layer's experts get ~32 tokens each, and the work is compute-bound
(0.72 TFLOP a layer call). The VNNI row dots of kernels_q8 top out near 2 TOP/s on 16 cores and
oneDNN's bf16 matmuls at ~1.4 TFLOP/s on 32-row shapes, with a dequantized copy of each expert
first; AMX's `tdpbusd` multiplies int8 tiles 8x faster than VNNI, on the packed weights as they
are: an int4 row's nibbles are its unsigned bytes (q + 8), int8 rows its signed ones.

Shapes. A weight tile A is 16 rows x KT of k (KT = 32 or 64 bytes); an activation tile B is KT
of k x 16 tokens in VNNI order; the product C [16 rows x 16 tokens] is int32. Weights have a
scale per row and group of G along k, activations a scale per token and 128 of k (as
kernels_q8): C is taken out of the tile unit and scaled every RR = min(G, 128) of k,
acc += (C - offset * sum(x)) * s_w[row] * s_x[token], where `offset` (8 for int4 nibbles, 0 for
int8) makes the unsigned bytes signed. An int4 group of G holds its k as G/2 bytes, the low
nibbles first (formats.py), so unpacking a group gives its k in natural order.

Flow of one call (ops.moe_gemm_amx), over the experts given (each with its pairs' tokens):
1. quantize each expert's tokens, 16 a tile, into B tiles (`quantize_tiles`);
2. gate/up: items of 32 rows of w13 (16 gate/up pairs) x all the expert's token tiles, taken by
   the threads from a shared counter; h = silu(gate) * up, in f32;
3. quantize h into B tiles; 4. down: items of 32 rows of w2 -> y [pair, H], times the pair's
   router weight; 5. out[token] += its pairs' y.

DEPENDS names the files whose code the cached kernels here compile in (tests check the hashes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from hetero.cpu_experts import amx
from hetero.cpu_experts.kernels import bf16_to_f32
from hetero.cpu_experts.simd_amx import TM, prefetch_rows, rescale, unpack_rows
from hetero.cpu_experts.simd_q8 import atomic_add

DEPENDS = {
    "simd_amx.py": "fcebcb743732a0e8",
    "amx.py": "770a879cbb6c3062",
    "kernels.py": "be66012f25d0439d",
    "simd_q8.py": "8265d2e58426e217",
}
JIT = {"nogil": True, "fastmath": True, "cache": True}
BLOCK = 128  # k per activation scale
A0, A1, B0, B1 = 1, 2, 3, 4  # tiles: rows 0-15 and 16-31 of an item; two token tiles
C00, C10, C01, C11 = 0, 5, 6, 7  # products: C[row half][token tile], 2 x 2 in flight
ROWS = 2 * TM  # weight rows an item


def tile_config(kt: int) -> np.ndarray:
    b = (kt // 4, 64)  # B tiles: KT/4 rows of 16 tokens x 4 k
    cs = {c: (TM, 64) for c in (C00, C10, C01, C11)}
    return amx.config({A0: (TM, kt), A1: (TM, kt), B0: b, B1: b} | cs)


def _dp_into(c: int, a: int, b: int):
    """An inline function: tile c += tile a . tile b (signed weights: int8, else int4 nibbles)."""

    @njit(inline="always", nogil=True, fastmath=True)
    def dp(tiles, int8):
        if int8:
            amx.tile_dp_bssd(tiles, c, a, b)
        else:
            amx.tile_dp_busd(tiles, c, a, b)

    return dp


_D00, _D10, _D01, _D11 = (
    _dp_into(C00, A0, B0), _dp_into(C10, A1, B0), _dp_into(C01, A0, B1), _dp_into(C11, A1, B1)
)  # fmt: skip


def _scale(s, i):
    """Scale i of a flat scale array (bf16 bits or f32) as f32."""


@overload(_scale, inline="always")
def _scale_impl(s, i):
    if s.dtype == types.uint16:
        return lambda s, i: bf16_to_f32(s[i])
    return lambda s, i: np.float32(s[i])


@njit(parallel=True, **JIT)
def quantize_tiles(src, index, kt, rr, xb, xs, xsum):
    """B tiles of the rows index [U, 16] of src [N, K] f32 (-1: a zero column).

    xb [U, K/KT, KT/4, 64] i8: tile u's k-chunk c, VNNI order (row kk holds k = 4 kk .. 4 kk + 3
    of each of the 16 tokens); xs [U, K/128, 16] f32: per token and 128 of k, amax / 127;
    xsum [U, K/RR, 16] i32: the sum of the quantized values over each RR of k."""
    U, K = index.shape[0], src.shape[1]
    for u in prange(U):
        xb[u] = 0
        xsum[u] = 0
        for m in range(TM):
            row = index[u, m]
            if row < 0:
                xs[u, :, m] = 0.0
                continue
            x = src[row]
            for b in range(K // BLOCK):
                amax = np.float32(0.0)
                for i in range(BLOCK):
                    amax = max(amax, abs(x[b * BLOCK + i]))
                xs[u, b, m] = amax / np.float32(127.0)
            for c in range(K // kt):  # (loops in k order: no division a value)
                scale = xs[u, c * kt // BLOCK, m]
                inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
                total = np.int32(0)
                for kk in range(kt // 4):
                    for j in range(4):
                        q = np.int32(np.rint(x[c * kt + 4 * kk + j] * inv))
                        xb[u, c, kk, 4 * m + j] = q
                        total += q
                xsum[u, c * kt // rr, m] += total


@njit(inline="always", **JIT)
def _rows_times_tiles(
    tiles, w, s, row0, K, G, kt, rr, offset, xb, xs, xsum, u0, nt, acc, ab, cbuf, sw, ahead
):  # fmt: skip
    """acc[t, n, m] = sum over k of weight row row0 + n times token m of tile u0 + t, for the
    32 rows from row0 of w (flat: int4 bytes K/2 a row, or int8 K a row) and nt token tiles.

    Tiles: 2 x 2 blocks (rows 0-15 and 16-31 x two token tiles), so that each tile loaded feeds
    two products (a load costs more than a product: bench/amx_micro.py). A chunk's C tiles are
    read back (rescaled) only after the next chunk's products are issued, and the next chunk's
    int4 rows are unpacked meanwhile: a tile store reaches ordinary loads only once it has left
    the core. `ahead`: bytes of each row prefetched ahead of use (0: none); the rows are read
    side by side, a line each at a time, more streams than the hardware prefetchers follow."""
    int8 = offset == 0
    rowb = K if int8 else K // 2
    nk, nq = rr // kt, K // rr
    bt = kt // 4 * 64  # bytes of a B tile
    step = K // kt * bt  # bytes of one token tile's B tiles
    ng = K // G
    sb = s.itemsize * ng  # scale bytes a row
    half = ROWS * rr  # ab: two buffers of unpacked rows, chunk q in half q % 2
    ctiles = nt * 2 * TM * TM  # cbuf: two sets of C tiles [nt, 2 row halves], chunk q's in q % 2
    acc[:ctiles] = 0.0
    if not int8:
        unpack_rows(w, row0 * rowb, rowb, ab, rr)
        unpack_rows(w, (row0 + TM) * rowb, rowb, ab[TM * rr :], rr)
    for q in range(nq):
        k0 = q * rr
        at = k0 if int8 else k0 // 2  # byte of the row
        if ahead > 0 and at % 64 == 0:
            prefetch_rows(w, row0 * rowb + at + ahead, rowb)
            prefetch_rows(w, (row0 + TM) * rowb + at + ahead, rowb)
            if (at * sb // rowb) % 64 == 0:
                prefetch_rows(s, row0 * sb + (at + ahead) * sb // rowb, sb)
                prefetch_rows(s, (row0 + TM) * sb + (at + ahead) * sb // rowb, sb)
        for r in range(ROWS):
            sw[q % 2, r] = _scale(s, (row0 + r) * ng + k0 // G)
        cq = q % 2 * ctiles * 4  # bytes
        for t in range(0, nt, 2):
            two = t + 1 < nt
            amx.tile_zero(tiles, C00)
            amx.tile_zero(tiles, C10)
            if two:
                amx.tile_zero(tiles, C01)
                amx.tile_zero(tiles, C11)
            for kh in range(nk):
                if int8:  # A straight from the weights
                    amx.tile_load(tiles, A0, w, row0 * rowb + k0 + kh * kt, rowb)
                    amx.tile_load(tiles, A1, w, (row0 + TM) * rowb + k0 + kh * kt, rowb)
                else:  # from the rows unpacked during the last chunk (one group a row)
                    amx.tile_load(tiles, A0, ab, q % 2 * half + kh * kt, rr)
                    amx.tile_load(tiles, A1, ab, q % 2 * half + TM * rr + kh * kt, rr)
                b0 = ((u0 + t) * (K // kt) + q * nk + kh) * bt
                amx.tile_load(tiles, B0, xb, b0, 64)
                _D00(tiles, int8)
                _D10(tiles, int8)
                if two:
                    amx.tile_load(tiles, B1, xb, b0 + step, 64)
                    _D01(tiles, int8)
                    _D11(tiles, int8)
            c0 = cq + t * 2 * TM * TM * 4  # C tiles of token tile t: [row half] 1 KB each
            amx.tile_store(tiles, C00, cbuf, c0, 64)
            amx.tile_store(tiles, C10, cbuf, c0 + 4 * TM * TM, 64)
            if two:
                amx.tile_store(tiles, C01, cbuf, c0 + 8 * TM * TM, 64)
                amx.tile_store(tiles, C11, cbuf, c0 + 12 * TM * TM, 64)
        if not int8 and q + 1 < nq:
            nxt = row0 * rowb + (k0 + rr) // 2
            unpack_rows(w, nxt, rowb, ab[(q + 1) % 2 * half :], rr)
            unpack_rows(w, nxt + TM * rowb, rowb, ab[(q + 1) % 2 * half + TM * rr :], rr)
        if q > 0:
            _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, q - 1, (q - 1) * rr // BLOCK)
    _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, nq - 1, (nq - 1) * rr // BLOCK)


@njit(inline="always", **JIT)
def _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, q, b):
    """acc [nt, 32, 16] += chunk q's C tiles (set q % 2 of cbuf), rescaled."""
    base = q % 2 * nt * 2 * TM * TM
    for t in range(nt):
        for hf in range(2):
            i = (2 * t + hf) * TM * TM
            c, a = cbuf[base + i : base + i + TM * TM], acc[i : i + TM * TM]
            rescale(c, a, xs[u0 + t, b], xsum[u0 + t, q], sw[q % 2, hf * TM :], offset)


@njit(parallel=True, **JIT)
def gate_up(
    w13, s13, H, I, G, offset, cfg, experts, first_tile, xb, xs, xsum, h, ahead, threads
):  # fmt: skip
    """Step 2: h [U, 16, I] f32 = silu(gate) * up of each expert's token tiles. w13, s13 flat
    (rows [E, I, 2]); experts [A]; first_tile [A + 1]: the expert's tiles among U."""
    kt, rr = tile_k(G)
    A = experts.shape[0]
    slabs = 2 * I // ROWS
    counter = np.zeros(16, np.int64)
    most = _most_tiles(first_tile)
    for _ in prange(threads):
        tiles, ab, sw, acc, cbuf = _scratch(most)
        amx.tile_config(tiles, cfg)
        i = atomic_add(counter, 0, 1)
        while i < A * slabs:
            a, slab = i // slabs, i % slabs
            u0, nt = first_tile[a], first_tile[a + 1] - first_tile[a]
            row0 = experts[a] * 2 * I + slab * ROWS
            _rows_times_tiles(tiles, w13, s13, row0, H, G, kt, rr, offset, xb, xs, xsum, u0,
                              nt, acc, ab, cbuf, sw, ahead)  # fmt: skip
            for t in range(nt):  # acc [nt, 32 rows, 16 tokens]: rows 2j, 2j + 1 gate, up of r
                for j in range(ROWS // 2):
                    r = slab * ROWS // 2 + j
                    for m in range(TM):
                        g = acc[(t * ROWS + 2 * j) * TM + m]
                        up = acc[(t * ROWS + 2 * j + 1) * TM + m]
                        h[u0 + t, m, r] = g / (np.float32(1.0) + np.exp(-g)) * up
            i = atomic_add(counter, 0, 1)
        amx.tile_release(tiles)


@njit(parallel=True, **JIT)
def down(w2, s2, H, I, G, offset, cfg, experts, first_tile, hb, hs, hsum, pairs, scale, y, ahead,
         threads):  # fmt: skip
    """Step 4: y [P, H] = scale[p] * down(h) for each pair p; pairs [U, 16]: the pair of each
    token column (-1: padding)."""
    kt, rr = tile_k(G)
    A = experts.shape[0]
    slabs = H // ROWS
    counter = np.zeros(16, np.int64)
    most = _most_tiles(first_tile)
    for _ in prange(threads):
        tiles, ab, sw, acc, cbuf = _scratch(most)
        amx.tile_config(tiles, cfg)
        i = atomic_add(counter, 0, 1)
        while i < A * slabs:
            a, slab = i // slabs, i % slabs
            u0, nt = first_tile[a], first_tile[a + 1] - first_tile[a]
            row0 = experts[a] * H + slab * ROWS
            _rows_times_tiles(tiles, w2, s2, row0, I, G, kt, rr, offset, hb, hs, hsum, u0,
                              nt, acc, ab, cbuf, sw, ahead)  # fmt: skip
            for t in range(nt):
                for m in range(TM):
                    p = pairs[u0 + t, m]
                    if p >= 0:
                        for n in range(ROWS):
                            y[p, slab * ROWS + n] = acc[(t * ROWS + n) * TM + m] * scale[p]
            i = atomic_add(counter, 0, 1)
        amx.tile_release(tiles)


@njit(parallel=True, **JIT)
def add_pairs(pos, y, out):
    """out[t] += sum of y over the pairs of token t (pos [T, k], -1 for slots not here)."""
    T, k = pos.shape
    for t in prange(T):
        for j in range(k):
            if pos[t, j] >= 0:
                out[t, :] += y[pos[t, j]]


@njit(**JIT)
def tile_k(G):
    """(KT, RR) for weights with a scale every G of k: k a tile product and k between two
    rescales (RR <= 128, the activation block; 2 tiles at most)."""
    rr = min(G, BLOCK)
    return min(rr, 64), rr


@njit(inline="always", **JIT)
def _most_tiles(first_tile):
    most = 1
    for a in range(first_tile.shape[0] - 1):
        most = max(most, first_tile[a + 1] - first_tile[a])
    return most


@njit(inline="always", **JIT)
def _scratch(most):
    """A thread's tile state (emulation) and buffers, for items of up to `most` token tiles:
    unpacked A rows and the rows' scales, two chunks of each; the f32 sums [most, 32, 16]; the C
    tiles of two chunks."""
    return (
        np.zeros(amx.TILES_BYTES, np.uint8),
        np.empty(2 * ROWS * BLOCK, np.uint8),
        np.empty((2, ROWS), np.float32),
        np.empty(most * ROWS * TM, np.float32),
        np.empty(2 * most * ROWS * TM, np.int32),
    )
