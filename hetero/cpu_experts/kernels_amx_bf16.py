"""The GEMM path of int4 experts on AMX bf16 tiles: weights dequantized to bf16 a tile at a time,
activations in bf16, f32 sums kept in the tile unit across all of k.

Why not int8 tiles for int4 (kernels_amx): there, the int32 sums must leave the tile unit and be
rescaled at every weight group (32 of k for int4-g32), and on the H100 machine's Xeon those
stores, reloads and rescales took as long as the products themselves without overlapping them
(bench/amx_ablate.py). `tdpbf16ps` accumulates in f32, so a weight's scale is applied when its
nibble is unpacked (one multiply-add per weight, vector work that does not wait on the tile
unit) and the sums are stored once an item. A bf16 product covers 32 of k against int8's 64, for
the same 16 cycles; the activations are not quantized (bf16 is also the more accurate).

Shapes. A weight tile A is 16 rows x 32 k (bf16, 64 bytes a row), unpacked from the packed
nibbles into a per-thread buffer holding all of an item's k (kt chunks, 1 KB each, 224 KB for
V3's K = 7168: in L2); an activation tile B is 32 k x 16 tokens, pairs of k a column (row kk
holds k = 2 kk, 2 kk + 1 of each token); C is 16 rows x 16 tokens f32. Items are 16 weight rows x
all of an expert's token tiles, four token tiles' C in the tile unit at a time (more: another
pass over the unpacked rows). The flow of a call is kernels_amx's (ops.moe_gemm_amx).

DEPENDS names the files whose code the cached kernels here compile in (tests check the hashes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hetero.cpu_experts import amx
from hetero.cpu_experts.kernels_amx import (  # tile numbers and epilogues: one set for both
    A0,
    A1,
    B0,
    B1,
    CS,
    JIT,
    TM,
    _most_tiles,
    down_rows,
    item_row,
    prefetch_ahead,
    silu_rows,
)
from hetero.cpu_experts.simd_amx import unpack_bf16
from hetero.cpu_experts.simd_pack import interleave16
from hetero.cpu_experts.simd_sync import atomic_add

DEPENDS = {
    "simd_amx.py": "06ab87a4c0786592",
    "amx.py": "2f565178e8129c46",
    "kernels.py": "2353efb5634e1e6f",
    "kernels_amx.py": "a29d59b0b0f88907",
    "simd_sync.py": "c305241e8e8190da",
    "simd_pack.py": "b0ae36ec8e24291a",
}
TK = 32  # k a product
SLICE = 128  # k unpacked at a time: a whole number of groups (32, 64 or 128)
KB = 256  # "kb": the most k a block (its B tiles of two token tiles: 16 KB)
TILE_BYTES = TM * 64
# the order of an item's tile loads and products (bench/amx_schedules.py times each alone):
# "1x4" 16 rows, an A tile against up to four token tiles' B; "2x2" 32 rows (two slabs), two A
# against two B (_slab_pair_times_tiles); "1x2db" 16 rows, two token tiles, two sets of
# operand registers for alternate chunks (_pairs_db_times_tiles)
# "kb" 64 rows (four slabs) with k in blocks, a block's B tiles kept in L1 for all four
# (_kblock_times_tiles)
ORDERS = ("1x4", "2x2", "1x2db", "kb")
SLABS = (1, 2, 1, 4)  # 16-row slabs an item, by order


def tile_config() -> np.ndarray:
    return amx.config({t: (TM, 64) for t in (A0, A1, B0, B1, *CS)})


@njit(parallel=True, **JIT)
def pack_tiles(src, index, xb):
    """B tiles of the rows index [U, 16] of src [N, K] f32 (-1: a zero column), as bf16 bits
    rounded to nearest even: xb [U, K/32, 16, 32] uint16, tile u's chunk c, row kk holding
    k = 32 c + 2 kk, + 1 of token m at 2 m, 2 m + 1. Each token's row is rounded in k order
    into b [16, K], then b's pairs (4-byte words) put side by side: pair i of token m at
    16 i + m."""
    U, K = index.shape[0], src.shape[1]
    bits = src.view(np.uint32)
    words = xb.reshape(U, K * TM).view(np.int32)
    for u in prange(U):
        b = np.empty((TM, K), np.uint16)
        for m in range(TM):
            row = index[u, m]
            if row < 0:
                b[m] = 0
                continue
            for k in range(K):
                v = bits[row, k]
                b[m, k] = (v + 0x7FFF + ((v >> 16) & 1)) >> 16
        b32 = b.reshape(-1).view(np.int32)
        for i in range(0, K // 2, TM):
            interleave16(b32, K // 2, i, words[u], TM * i)


def _products_with(a: int):
    """An inline function: C of token tiles 0..n-1 (up to 4) += weight tile `a` . their B
    tiles, from byte `at` of xb, `step` bytes apart (B tiles alternate between two registers)."""

    @njit(inline="always", nogil=True, fastmath=True)
    def products(tiles, xb, at, step, n):
        amx.tile_load(tiles, B0, xb, at, 64)
        amx.tile_dp_bf16ps(tiles, CS[0], a, B0)
        if n > 1:
            amx.tile_load(tiles, B1, xb, at + step, 64)
            amx.tile_dp_bf16ps(tiles, CS[1], a, B1)
        if n > 2:
            amx.tile_load(tiles, B0, xb, at + 2 * step, 64)
            amx.tile_dp_bf16ps(tiles, CS[2], a, B0)
        if n > 3:
            amx.tile_load(tiles, B1, xb, at + 3 * step, 64)
            amx.tile_dp_bf16ps(tiles, CS[3], a, B1)

    return products


_WITH_A0, _WITH_A1 = _products_with(A0), _products_with(A1)


def _chunk_on(a: int, b0: int, b1: int):
    """An inline function: C tiles 0 and 5 += A . B of token tiles 0 and 1 (n of them) for one
    chunk, its operands loaded into tiles a, b0, b1 (ORDERS' "1x2db": two such sets of
    registers alternate, so a chunk's loads do not wait on the previous chunk's products)."""

    @njit(inline="always", nogil=True, fastmath=True)
    def chunk(tiles, ab, a_at, xb, at, step, n):
        amx.tile_load(tiles, a, ab, a_at, 64)
        amx.tile_load(tiles, b0, xb, at, 64)
        if n > 1:
            amx.tile_load(tiles, b1, xb, at + step, 64)
        amx.tile_dp_bf16ps(tiles, CS[0], a, b0)
        if n > 1:
            amx.tile_dp_bf16ps(tiles, CS[1], a, b1)

    return chunk


_SET0, _SET1 = _chunk_on(A0, B0, B1), _chunk_on(A1, CS[2], CS[3])


@njit(inline="always", **JIT)
def _unpack_slice(w, s, row0, K, G, ng, gs, sl, ab, ahead, nrow0):
    """Slice sl (128 of k) of the 16 rows from row0 of w (int4, K/2 bytes a row, scales s a
    group: ng a row, gs a slice) into ab, prefetching `ahead` bytes further on (at most a row,
    _items' cap: past the rows' end, the next item's from nrow0; -1: none). (ng, gs from the
    caller: no division a slice.)"""
    rowb = K // 2
    k0 = sl * SLICE
    if ahead > 0:
        prefetch_ahead(w, row0, nrow0, rowb, k0 // 2 + ahead)
    for g in range(sl * gs, (sl + 1) * gs):
        unpack_bf16(w, row0 * rowb + g * G // 2, rowb, s, row0 * ng + g, ng, ab,
                    g * G // TK * TM * TK, G)  # fmt: skip


@njit(inline="always", nogil=True, fastmath=True)
def _chunk_pair_1x4(tiles, ab, a_at, xb, c, at, step, n):
    """Chunks c and c + 1 (their rows in ab from byte a_at): each one A tile against the B
    tiles of up to 4 token tiles."""
    amx.tile_load(tiles, A0, ab, a_at + c * TILE_BYTES, 64)
    _WITH_A0(tiles, xb, at + c * TILE_BYTES, step, n)
    amx.tile_load(tiles, A1, ab, a_at + (c + 1) * TILE_BYTES, 64)
    _WITH_A1(tiles, xb, at + (c + 1) * TILE_BYTES, step, n)


@njit(inline="always", nogil=True, fastmath=True)
def _chunk_pair_db(tiles, ab, a_at, xb, c, at, step, n):
    """Chunks c and c + 1 of two token tiles, each on its own set of registers (_chunk_on)."""
    _SET0(tiles, ab, a_at + c * TILE_BYTES, xb, at + c * TILE_BYTES, step, n)
    _SET1(tiles, ab, a_at + (c + 1) * TILE_BYTES, xb, at + (c + 1) * TILE_BYTES, step, n)


def _rows_in_order(group: int, chunk_pair):
    """An inline function: acc[t, n, m] = sum over k of weight row row0 + n (int4 w, bf16
    scales s) times token m of tile u0 + t, for the 16 rows from row0 and nt token tiles (xb:
    their B tiles, flat bytes), `group` token tiles' sums in the tile unit at a time, each
    pair of chunks by `chunk_pair`. The rows are unpacked a slice ahead of the products that
    use them, into ab (all of k)."""

    @njit(inline="always", nogil=True, fastmath=True)
    def rows_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0):
        step = K // TK * TILE_BYTES  # bytes of one token tile's B tiles
        ng, gs = K // G, SLICE // G  # scale groups a row, a slice
        for g0 in range(0, nt, group):
            n = min(group, nt - g0)
            _zero_sums(tiles)
            first = g0 == 0
            if first:
                _unpack_slice(w, s, row0, K, G, ng, gs, 0, ab, ahead, nrow0)
            at = (u0 + g0) * step
            for sl in range(K // SLICE):
                for c in range(sl * SLICE // TK, (sl + 1) * SLICE // TK, 2):
                    chunk_pair(tiles, ab, 0, xb, c, at, step, n)
                if first and sl + 1 < K // SLICE:  # vector work beside the products in flight
                    _unpack_slice(w, s, row0, K, G, ng, gs, sl + 1, ab, ahead, nrow0)
            _sums_out(tiles, acc, g0 * TM * TM * 4, n)

    return rows_times_tiles


_rows_times_tiles = _rows_in_order(len(CS), _chunk_pair_1x4)  # "1x4"
_pairs_db_times_tiles = _rows_in_order(2, _chunk_pair_db)  # "1x2db"


def _sums_moved_by(op):
    """An inline function: C tiles 0..n-1 (CS) to (tile_store) or from (tile_load) acc from
    byte `at`, a 16 x 16 f32 tile (1 KB) after another."""

    @njit(inline="always", nogil=True, fastmath=True)
    def move(tiles, acc, at, n):
        op(tiles, CS[0], acc, at, 64)
        if n > 1:
            op(tiles, CS[1], acc, at + TILE_BYTES, 64)
        if n > 2:
            op(tiles, CS[2], acc, at + 2 * TILE_BYTES, 64)
        if n > 3:
            op(tiles, CS[3], acc, at + 3 * TILE_BYTES, 64)

    return move


_sums_out, _sums_in = _sums_moved_by(amx.tile_store), _sums_moved_by(amx.tile_load)


@njit(inline="always", **JIT)
def _zero_sums(tiles):
    amx.tile_zero(tiles, CS[0])
    amx.tile_zero(tiles, CS[1])
    amx.tile_zero(tiles, CS[2])
    amx.tile_zero(tiles, CS[3])


@njit(inline="always", **JIT)
def _kblock_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0):
    """_rows_times_tiles for 64 rows (four slabs) with k in blocks of kb: a block's B tiles
    (nt token tiles x kb of k, at most 16 KB: in L1) feed the four slabs in turn, each slab's
    block of rows unpacked into one of two buffers (8 KB, in L1) during the products of the
    slab before it, and the sums leaving the tile unit between blocks. acc: slab j's sums
    [nt, 16, 16] from element j * nt * 256."""
    rowb, ng = K // 2, K // G
    gshift = 5 if G == 32 else 6 if G == 64 else 7  # (no division in the chunk loop)
    kb = KB if nt <= 2 and K % KB == 0 else SLICE
    step = K // TK * TILE_BYTES  # bytes of one token tile's B tiles
    half, sums = kb * TM, nt * TM * TM * 4  # elements of a buffer; bytes of a slab's sums
    nrows = (nrow0, nrow0 + TM, nrow0 + 2 * TM, nrow0 + 3 * TM) if nrow0 >= 0 else (-1,) * 4
    for g in range(kb >> gshift):  # unit 0 (block 0, slab 0); then each unit unpacks the next
        _unpack_group(w, s, row0, rowb, G, ng, g, g << gshift, 0, ab, 0, ahead, nrows[0])
    unit = 0
    for k0 in range(0, K, kb):
        for j in range(4):
            cur, nxt = unit % 2 * half * 2, (unit + 1) % 2 * half  # (bytes; elements)
            nj, nk0 = (j + 1, k0) if j < 3 else (0, k0 + kb)  # the next unit
            for g0 in range(0, nt, len(CS)):
                n = min(len(CS), nt - g0)
                c_at = j * sums + g0 * TILE_BYTES
                if k0 == 0:
                    _zero_sums(tiles)
                else:
                    _sums_in(tiles, acc, c_at, n)
                at = (u0 + g0) * step + k0 // TK * TILE_BYTES
                for c in range(0, kb // TK, 2):
                    _chunk_pair_1x4(tiles, ab, cur, xb, c, at, step, n)
                    for r in range(c * TK, (c + 2) * TK, TK):  # the next unit's groups here
                        if g0 == 0 and nk0 < K and r & (G - 1) == 0:
                            _unpack_group(w, s, row0 + nj * TM, rowb, G, ng, (nk0 + r) >> gshift,
                                          r, nk0, ab, nxt, ahead, nrows[nj])  # fmt: skip
                _sums_out(tiles, acc, c_at, n)
            unit += 1


@njit(inline="always", **JIT)
def _unpack_group(w, s, row0, rowb, G, ng, g, r, k0, ab, base, ahead, nrow0):
    """Group g (k from k0 + r) of the 16 rows from row0 into the buffer at element `base` of
    ab, at the block's chunk r / 32, prefetching `ahead` bytes on (the line a 128 of k; past
    the rows' end: from nrow0)."""
    if ahead > 0 and r & (SLICE - 1) == 0:
        prefetch_ahead(w, row0, nrow0, rowb, (k0 + r) // 2 + ahead)
    at = row0 * rowb + g * G // 2  # (row-major rows only: bench/amx_layout rewrites the other)
    unpack_bf16(w, at, rowb, s, row0 * ng + g, ng, ab, base + r // TK * TM * TK, G)


@njit(inline="always", **JIT)
def _slab_pair_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0):
    """_rows_times_tiles for 32 rows (two slabs of 16, unpacked into ab's two halves) and two
    token tiles at a time: each B tile feeds both slabs' products and each A tile both token
    tiles', a tile load a product against 1.5 for one slab at two token tiles (the H200's tile
    micro-bench: a product with its operands loaded from L2 ~3x one without; unmeasured in the
    kernel: off unless asked for). acc: slab 0's sums [nt, 16, 16], then slab 1's."""
    nc = K // TK
    step = nc * TILE_BYTES  # bytes of one token tile's B tiles
    ng, gs = K // G, SLICE // G
    half = K * TM  # ab's values a slab (bf16 bits)
    second = ab[half:]
    nrow1 = nrow0 + TM if nrow0 >= 0 else nrow0
    for g0 in range(0, nt, 2):
        n = min(2, nt - g0)
        _zero_sums(tiles)
        first = g0 == 0
        if first:
            _unpack_slice(w, s, row0, K, G, ng, gs, 0, ab, ahead, nrow0)
            _unpack_slice(w, s, row0 + TM, K, G, ng, gs, 0, second, ahead, nrow1)
        at = (u0 + g0) * step
        for sl in range(K // SLICE):
            for c in range(sl * SLICE // TK, (sl + 1) * SLICE // TK):
                amx.tile_load(tiles, A0, ab, c * TILE_BYTES, 64)
                amx.tile_load(tiles, A1, ab, 2 * half + c * TILE_BYTES, 64)
                amx.tile_load(tiles, B0, xb, at + c * TILE_BYTES, 64)
                amx.tile_dp_bf16ps(tiles, CS[0], A0, B0)
                amx.tile_dp_bf16ps(tiles, CS[2], A1, B0)
                if n > 1:
                    amx.tile_load(tiles, B1, xb, at + step + c * TILE_BYTES, 64)
                    amx.tile_dp_bf16ps(tiles, CS[1], A0, B1)
                    amx.tile_dp_bf16ps(tiles, CS[3], A1, B1)
            if first and sl + 1 < K // SLICE:
                _unpack_slice(w, s, row0, K, G, ng, gs, sl + 1, ab, ahead, nrow0)
                _unpack_slice(w, s, row0 + TM, K, G, ng, gs, sl + 1, second, ahead, nrow1)
        other = nt * TM * TM * 4  # bytes: slab 1's sums
        amx.tile_store(tiles, CS[0], acc, g0 * TM * TM * 4, 64)
        amx.tile_store(tiles, CS[2], acc, other + g0 * TM * TM * 4, 64)
        if n > 1:
            amx.tile_store(tiles, CS[1], acc, (g0 + 1) * TM * TM * 4, 64)
            amx.tile_store(tiles, CS[3], acc, other + (g0 + 1) * TM * TM * 4, 64)


@njit(**JIT)
def gate_up(w13, s13, H, I, G, cfg, experts, first_tile, xb, h, ahead, threads, order=0):
    """h [U, 16, I] f32 = silu(gate) * up of each expert's token tiles. w13, s13 flat (rows
    [E, I, 2]); experts [A]; first_tile [A + 1]: the expert's tiles among U; xb: pack_tiles."""
    pairs, scale, y = (
        np.empty((0, 0), np.int64),
        np.empty(0, np.float32),
        np.empty((0, 0), np.float32),
    )
    _items(w13, s13, H, 2 * I, G, cfg, experts, first_tile, xb, ahead, threads, True, h, pairs,
           scale, y, order)  # fmt: skip


@njit(**JIT)
def down(w2, s2, H, I, G, cfg, experts, first_tile, hb, pairs, scale, y, ahead, threads, order=0):
    """y [P, H] = scale[p] * down(h) for each pair p; pairs [U, 16]: the pair of each token
    column (-1: padding); hb: pack_tiles of h. `order`: ORDERS' index (R a whole number of
    its items' SLABS[order] x 16 rows)."""
    h = np.empty((0, 0, 0), np.float32)
    _items(w2, s2, I, H, G, cfg, experts, first_tile, hb, ahead, threads, False, h, pairs, scale, y,
           order)  # fmt: skip


@njit(parallel=True, **JIT)
def _items(w, s, K, R, G, cfg, experts, first_tile, xb, ahead, threads, gate, h, pairs, scale,
           y, order):  # fmt: skip
    """Items of SLABS[order] x 16 of an expert's R rows x its token tiles, in ORDERS[order], from a
    shared counter; their sums to h (gate: gate/up rows, silu) or to y (down rows, router
    weights)."""
    slabs = SLABS[order]
    A, rows = experts.shape[0], slabs * TM
    per = R // rows  # items an expert
    ahead = min(ahead, K // 2)  # at most a row (int4: K/2 bytes), then into the next item
    counter = np.zeros(16, np.int64)
    most = _most_tiles(first_tile)
    for _ in prange(threads):
        tiles, ab, acc = _thread_state(cfg, 2 * KB if order == 3 else slabs * K, most, slabs)
        i = atomic_add(counter, 0, 1)
        nxt = atomic_add(counter, 0, 1)  # claimed an item early: its rows are prefetched
        while i < A * per:
            a, slab = i // per, i % per * slabs
            u0, nt = first_tile[a], first_tile[a + 1] - first_tile[a]
            row0 = experts[a] * R + slab * TM
            nrow0 = item_row(nxt, experts, per, R, rows)
            if order == 1:
                _slab_pair_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0)
            elif order == 2:
                _pairs_db_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0)
            elif order == 3:
                _kblock_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0)
            else:
                _rows_times_tiles(tiles, w, s, row0, K, G, xb, u0, nt, acc, ab, ahead, nrow0)
            for j in range(slabs):
                sums = acc[j * nt * TM * TM :]
                if gate:
                    silu_rows(sums, h, u0, nt, slab + j)
                else:
                    down_rows(sums, y, pairs, scale, u0, nt, slab + j)
            i, nxt = nxt, atomic_add(counter, 0, 1)
        amx.tile_release(tiles)


@njit(inline="always", **JIT)
def _thread_state(cfg, k, most, slabs):
    """A thread's tiles, configured, a buffer of unpacked rows (k of k for 16 rows, bf16 bits)
    and the f32 sums [slabs, most, 16, 16] of its token tiles."""
    tiles = np.zeros(amx.TILES_BYTES, np.uint8)
    amx.tile_config(tiles, cfg)
    return (
        tiles,
        np.empty(k * TM, np.uint16),
        np.empty(slabs * most * TM * TM, np.float32),
    )
