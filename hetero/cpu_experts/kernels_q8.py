"""numba kernels of int4 and int8 experts on int8 activations (AVX-512 VNNI where the CPU has it).

Why: with fp32 activations each int4 weight costs an unpack, an int->float conversion and an FMA,
so a Xeon core consumes ~7 G weights/s and 16 cores cannot keep up with RAM. Quantizing the
activations to int8 (a scale per 128 of K, as llama.cpp's Q8 blocks) turns the row dot into
`vpdpbusd`: 64 nibble x int8 products a instruction into 16 int32 lanes, one int->float
conversion and one FMA per 128 weights. The row dots and the other intrinsics are simd_q8.py's
(the weights' and activations' layout is described there).

numba's disk cache is keyed by the defining file only: the kernels here inline simd_q8.py's
intrinsics, so DEPENDS names that file's hash (tests/test_cpu_engine.py checks it) and a change
there is a change here too.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from hetero.cpu_experts.simd_pack import block_amax
from hetero.cpu_experts.simd_q8 import (
    BLOCK,
    q8_pair_dot1,
    q8_pair_dot2,
    q8_pair_dot3,
    q8_pair_dot4,
    q8_row_dot,
    q8_row_dot2,
    q8_row_dot3,
    q8_row_dot4,
)
from hetero.cpu_experts.simd_sync import (
    atomic_add,
    atomic_load,
    borrowed,
    cycle_counter,
    spin_pause,
)

# what the cached kernels here compile in from other files: file -> sha256 (16 hex digits)
DEPENDS = {
    "simd_q8.py": "9ac2d2e1685a1995",
    "simd_sync.py": "c305241e8e8190da",
    "simd_pack.py": "b0ae36ec8e24291a",
}
JIT = {"nogil": True, "fastmath": True, "cache": True}
LINE = 16  # int64s between two atomic counters: each on its own cache line (and prefetch pair)


@njit(**JIT)
def read_cycles():
    return cycle_counter()


def cycle_rate(over_s: float = 0.02) -> float:
    """Ticks a second of the CPU's cycle counter (constant-rate TSC), measured over `over_s`."""
    read_cycles()  # compiled (or loaded) first
    t0, c0 = time.perf_counter(), read_cycles()
    time.sleep(over_s)
    return (read_cycles() - c0) / (time.perf_counter() - t0)


@njit(**JIT)
def quantize_row(x, gshift, offset, xq, xs, xa):
    """x [K] f32 -> int8 in the block order of a packed int4 row of group 1 << gshift.

    xq [K] i8: per block of 128 k, the values under its 64 low nibbles, then its 64 high ones;
    xs [K/128] f32: the block scales (amax / 127); xa [K/128 * 16] i32: each lane's start value,
    -offset * the sum of the 8 activations it multiplies (the weights' unsigned offset: 8 for
    int4 nibbles, 128 for int8, whose order is natural: gshift 7)."""
    half = (1 << gshift) // 2
    for blk in range(xs.shape[0]):
        scale = block_amax(x, blk * BLOCK) / np.float32(127.0)
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        xs[blk] = scale
        xb, qb = x[blk * BLOCK : (blk + 1) * BLOCK], xq[blk * BLOCK : (blk + 1) * BLOCK]
        h = min(half, 64)  # k of a group's first half (low nibbles' bytes), then its second
        for g in range(64 // h):
            lo, hi = xb[2 * g * h : (2 * g + 1) * h], xb[(2 * g + 1) * h : (2 * g + 2) * h]
            ql, qh = qb[g * h : (g + 1) * h], qb[64 + g * h : 64 + (g + 1) * h]
            for i in range(h):
                ql[i] = np.int8(np.rint(lo[i] * inv))
                qh[i] = np.int8(np.rint(hi[i] * inv))
        for lane in range(16):
            total = np.int32(0)
            for i in range(4):
                total += np.int32(qb[4 * lane + i]) + np.int32(qb[64 + 4 * lane + i])
            xa[blk * 16 + lane] = -offset * total


@njit(parallel=True, **JIT)
def moe_gemv_q8(
    x, weights, experts, ptr, pair_token, pair_slot, w13, s13, w2, s2, y, rows, offset, ahead,
    threads,
):  # fmt: skip
    """The routed experts of one layer on int8 activations (see moe_gemv in kernels.py): packed
    int4 (offset 8) or int8 (offset 128, a scale per row or per 128) weights; `ahead`: software
    prefetch distance in bytes (0: none); `threads`: numba's thread count (get_num_threads()
    in the caller: called in here, it would keep numba from caching the kernel).

    x [T, H] f32; H and I multiples of 128. y [P, H] f32: each pair's weighted output (summed per
    token by kernels.combine).

    One parallel region, no barrier: the work is items of `rows` gate/up rows of an expert (A x
    nb1), then of as many bytes of down rows (A x nb2). Each phase's items are split into one
    contiguous range per thread (long sequential reads); a thread takes its own range's items
    in order, then takes what is left of the others' ranges (an atomic counter per range), so a
    slow core (this runs in VMs) delays only the items it holds. An expert's down items wait
    (spinning) until its last gate/up item is done and has quantized its h.
    """
    T, H = x.shape
    A, I, P = experts.shape[0], w13.shape[1], pair_token.shape[0]
    sh13, sh2 = _scale_shift(H, s13.shape[3]), _scale_shift(I, s2.shape[2])
    # activation order: an int4 group's nibble layout (G <= 128), or natural for int8
    q13 = _log2(H // s13.shape[3]) if offset == 8 else 7
    q2 = _log2(I // s2.shape[2]) if offset == 8 else 7
    xq = np.empty((T, H), np.int8)
    xs = np.empty((T, H // BLOCK), np.float32)
    xa = np.empty((T, H // BLOCK * 16), np.int32)
    h = np.empty((P, I), np.float32)  # silu(gate) * up of each pair
    hq = np.empty((P, I), np.int8)
    hs = np.empty((P, I // BLOCK), np.float32)
    ha = np.empty((P, I // BLOCK * 16), np.int32)
    rows2 = max(1, rows * 2 * w13.shape[3] // w2.shape[2])  # down rows of a gate/up item's bytes
    nb1, nb2 = (I + rows - 1) // rows, (H + rows2 - 1) // rows2
    n = threads
    # state[LINE * c]: one counter a cache line. c = 0: tokens taken, 1: tokens quantized,
    # 2 + a: expert a's gate/up items done (nb1 + 1 once its h is quantized), 2 + A + v: items
    # taken of range v of phase 1, 2 + A + n + v: of phase 2
    state = np.zeros(LINE * (2 + A + 2 * n), np.int64)
    for j in prange(n):
        # (views without owner: no reference count shared by the threads; simd_sync.borrowed)
        w13b, s13b, w2b, s2b = borrowed(w13), borrowed(s13), borrowed(w2), borrowed(s2)
        xb, xqb, xsb, xab = borrowed(x), borrowed(xq), borrowed(xs), borrowed(xa)
        hb, hqb, hsb, hab = borrowed(h), borrowed(hq), borrowed(hs), borrowed(ha)
        while True:
            t = atomic_add(state, 0, 1)
            if t >= T:
                break
            quantize_row(xb[t], q13, offset, xqb[t], xsb[t], xab[t])
            atomic_add(state, LINE, 1)
        while atomic_load(state, LINE) < T:
            spin_pause()
        for v in range(j, j + n):  # own range first, then the others'
            v %= n
            lo, hi = A * nb1 * v // n, A * nb1 * (v + 1) // n
            i = lo + atomic_add(state, LINE * (2 + A + v), 1)
            while i < hi:
                a, r0 = i // nb1, i % nb1 * rows
                _gate_up(w13b[experts[a]], s13b[experts[a]], xq, xs, xa, pair_token, ptr[a],
                         ptr[a + 1], r0, min(r0 + rows, I), h, sh13, ahead)  # fmt: skip
                if atomic_add(state, LINE * (2 + a), 1) == nb1 - 1:  # the expert's last item
                    for p in range(ptr[a], ptr[a + 1]):
                        quantize_row(hb[p], q2, offset, hqb[p], hsb[p], hab[p])
                    atomic_add(state, LINE * (2 + a), 1)
                i = lo + atomic_add(state, LINE * (2 + A + v), 1)
        for v in range(j, j + n):
            v %= n
            lo, hi = A * nb2 * v // n, A * nb2 * (v + 1) // n
            i = lo + atomic_add(state, LINE * (2 + A + n + v), 1)
            while i < hi:
                a, r0 = i // nb2, i % nb2 * rows2
                while atomic_load(state, LINE * (2 + a)) <= nb1:
                    spin_pause()
                _down(w2b[experts[a]], s2b[experts[a]], hq, hs, ha, weights, pair_token, pair_slot,
                      ptr[a], ptr[a + 1], r0, min(r0 + rows2, H), y, sh2, ahead)  # fmt: skip
                i = lo + atomic_add(state, LINE * (2 + A + n + v), 1)


@njit(inline="always", **JIT)
def _gate_up(w13, s13, xq, xs, xa, pair_token, start, end, r0, r1, h, sh, ahead):
    """h[p, r] = silu(gate_r x_t) * up_r x_t for the expert's pairs p in [start, end), t their
    tokens, rows r in [r0, r1) of w13 [I, 2, .]. Up to four tokens a pass over the gate and up
    rows together: each row is unpacked once for them, each token's activations loaded once
    for both rows."""
    for r in range(r0, r1):
        wg, sg, wu, su = w13[r, 0], s13[r, 0], w13[r, 1], s13[r, 1]
        p = start
        while p + 4 <= end:
            t0, t1, t2, t3 = pair_token[p], pair_token[p + 1], pair_token[p + 2], pair_token[p + 3]
            gu = q8_pair_dot4(wg, sg, wu, su, xq, xs, xa, t0, t1, t2, t3, sh, ahead)
            for j in range(4):
                h[p + j, r] = _silu_mul(gu[j], gu[4 + j])
            p += 4
        left = end - p  # 0-3 tokens: one pass for them too
        if left == 3:
            t0, t1, t2 = pair_token[p], pair_token[p + 1], pair_token[p + 2]
            gu3 = q8_pair_dot3(wg, sg, wu, su, xq, xs, xa, t0, t1, t2, sh, ahead)
            for j in range(3):
                h[p + j, r] = _silu_mul(gu3[j], gu3[3 + j])
        elif left == 2:
            t0, t1 = pair_token[p], pair_token[p + 1]
            gu2 = q8_pair_dot2(wg, sg, wu, su, xq, xs, xa, t0, t1, sh, ahead)
            for j in range(2):
                h[p + j, r] = _silu_mul(gu2[j], gu2[2 + j])
        elif left == 1:  # (batch 1: each row on its own, as measured at the decode targets)
            t = pair_token[p]
            g1 = q8_row_dot(wg, sg, xq[t], xs[t], xa[t], sh, ahead)
            h[p, r] = _silu_mul(g1, q8_row_dot(wu, su, xq[t], xs[t], xa[t], sh, ahead))


@njit(inline="always", **JIT)
def _down(w2, s2, hq, hs, ha, weights, pair_token, pair_slot, start, end, r0, r1, y, sh, ahead):
    """y[p, r] = weight_p * (down_r h_p) for pairs p in [start, end), rows [r0, r1) of w2 [H, .];
    with two pairs or more, two rows a pass (each pair's activations loaded once for both)."""
    alone = r0  # the rows from here on, one a pass
    if end - start >= 2:
        while alone + 2 <= r1:
            _down_rows2(w2[alone], s2[alone], w2[alone + 1], s2[alone + 1], hq, hs, ha, weights,
                        pair_token, pair_slot, start, end, alone, y, sh, ahead)  # fmt: skip
            alone += 2
    for r in range(alone, r1):
        wd, sd = w2[r], s2[r]
        p = start
        while p + 4 <= end:
            d = q8_row_dot4(wd, sd, hq, hs, ha, p, p + 1, p + 2, p + 3, sh, ahead)
            for j in range(4):
                y[p + j, r] = d[j] * weights[pair_token[p + j], pair_slot[p + j]]
            p += 4
        left = end - p
        if left == 3:
            d3 = q8_row_dot3(wd, sd, hq, hs, ha, p, p + 1, p + 2, sh, ahead)
            for j in range(3):
                y[p + j, r] = d3[j] * weights[pair_token[p + j], pair_slot[p + j]]
        elif left == 2:
            d2 = q8_row_dot2(wd, sd, hq, hs, ha, p, p + 1, sh, ahead)
            for j in range(2):
                y[p + j, r] = d2[j] * weights[pair_token[p + j], pair_slot[p + j]]
        elif left == 1:
            wt = weights[pair_token[p], pair_slot[p]]
            y[p, r] = q8_row_dot(wd, sd, hq[p], hs[p], ha[p], sh, ahead) * wt


@njit(inline="always", **JIT)
def _down_rows2(wa, sa, wb, sb, hq, hs, ha, weights, pair_token, pair_slot, start, end, r, y, sh,
                ahead):  # fmt: skip
    """`_down` of rows r (wa, sa) and r + 1 (wb, sb) in one pass over them a few pairs at once."""
    p = start
    while p + 4 <= end:
        d = q8_pair_dot4(wa, sa, wb, sb, hq, hs, ha, p, p + 1, p + 2, p + 3, sh, ahead)
        for j in range(4):
            wt = weights[pair_token[p + j], pair_slot[p + j]]
            y[p + j, r], y[p + j, r + 1] = d[j] * wt, d[4 + j] * wt
        p += 4
    left = end - p
    if left == 3:
        d3 = q8_pair_dot3(wa, sa, wb, sb, hq, hs, ha, p, p + 1, p + 2, sh, ahead)
        for j in range(3):
            wt = weights[pair_token[p + j], pair_slot[p + j]]
            y[p + j, r], y[p + j, r + 1] = d3[j] * wt, d3[3 + j] * wt
    elif left == 2:
        d2 = q8_pair_dot2(wa, sa, wb, sb, hq, hs, ha, p, p + 1, sh, ahead)
        for j in range(2):
            wt = weights[pair_token[p + j], pair_slot[p + j]]
            y[p + j, r], y[p + j, r + 1] = d2[j] * wt, d2[2 + j] * wt
    elif left == 1:
        d1 = q8_pair_dot1(wa, sa, wb, sb, hq, hs, ha, p, sh, ahead)
        wt = weights[pair_token[p], pair_slot[p]]
        y[p, r], y[p, r + 1] = d1[0] * wt, d1[1] * wt


@njit(inline="always", **JIT)
def _scale_shift(K, groups):
    """log2 of the scale group along K; one scale a row (group K, any K): a shift past any k."""
    return 62 if groups == 1 else _log2(K // groups)


@njit(inline="always", **JIT)
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(inline="always", **JIT)
def _log2(n):
    s = 0
    while (1 << (s + 1)) <= n:
        s += 1
    return s
