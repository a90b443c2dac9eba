"""numba kernels of the CPU experts. Raw kernels only: launchers are in ops.py, policy in engine.py.

`row_dot` is specialized at compile time by the weight array's dtype (uint16: bf16 bits, int8,
uint8: packed int4), so one kernel source serves every format. All kernels release the GIL.
Everything compiled with cache=True lives in this one file: numba's disk cache is invalidated by
the defining file's timestamp only, so a helper in another module could go stale in the cache.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

JIT = {"nogil": True, "fastmath": True, "cache": True}


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterprets the low 32 bits of an integer as float32 (bf16 widening is `bits << 16`)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always", **JIT)
def bf16_to_f32(u):
    return _f32_from_bits(np.uint32(u) << 16)


# --- int4 rows in explicit SIMD ---------------------------------------------------------
# Explicit 16-lane SIMD in LLVM IR for the row dot product that LLVM will not vectorize well
# from plain numba code: int4 rows with a scale every 32..128 weights.
#
# From numba, a loop over a group reduces its vector to a scalar at every group end, so int4
# ran at a quarter of int8's speed a core. Here the accumulator stays a <16 x float> across the
# whole row: each 16-byte chunk (32 weights) is unpacked, multiplied by x, scaled lane-wise by its
# group's scale, and only the row's end reduces horizontally.

I8, I16, I32, I64, F32 = (
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
    ir.FloatType(),
)
V_I8, V_I32, V_F32 = ir.VectorType(I8, 16), ir.VectorType(I32, 16), ir.VectorType(F32, 16)
FAST = ("fast",)


def _splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    v = builder.insert_element(ir.Constant(V_F32, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(V_F32, ir.Undefined), ir.Constant(V_I32, [0] * 16))


def _vector_at(
    builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, vty: ir.VectorType, align: int
):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vty.as_pointer()), align=align)


def int4_simd_ok(w, s, x) -> bool:
    """The intrinsic needs C-contiguous rows: w uint8 [K/2], s uint16 [K/G], x float32 [K]."""
    return all(
        isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 for a in (w, s, x)
    ) and ((w.dtype, s.dtype, x.dtype) == (types.uint8, types.uint16, types.float32))


@intrinsic
def int4_row_dot(typingctx, w, s, x, G):
    """sum_k w[k] * x[k] for one packed int4 row w [K/2] with bf16 scales s [K/G]; G % 32 == 0."""
    if not (int4_simd_ok(w, s, x) and isinstance(G, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        w_ary, s_ary, x_ary = (
            context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:3], args[:3])
        )
        G64 = builder.sext(args[3], I64) if args[3].type.width < 64 else args[3]
        groups = builder.extract_value(s_ary.shape, 0)
        chunks = builder.udiv(G64, ir.Constant(I64, 32))  # 16-byte chunks (32 weights) a group
        half = builder.udiv(G64, ir.Constant(I64, 2))
        w_base = builder.bitcast(w_ary.data, I8.as_pointer())
        s_base = builder.bitcast(s_ary.data, I16.as_pointer())
        x_base = builder.bitcast(x_ary.data, F32.as_pointer())
        zero = ir.Constant(V_F32, [0.0] * 16)
        acc_ptr = cgutils.alloca_once_value(builder, zero)  # promoted to a register by LLVM
        part_ptr = cgutils.alloca_once_value(builder, zero)
        c15, c4, c8 = (ir.Constant(V_I32, [v] * 16) for v in (15, 4, 8))
        with cgutils.for_range(builder, groups) as group:
            g = group.index
            builder.store(zero, part_ptr)
            with cgutils.for_range(builder, chunks) as chunk:
                t = chunk.index
                byte = builder.mul(builder.add(builder.mul(g, chunks), t), ir.Constant(I64, 16))
                nib = builder.zext(_vector_at(builder, w_base, byte, V_I8, 1), V_I32)
                lo = builder.sitofp(builder.sub(builder.and_(nib, c15), c8), V_F32)
                hi = builder.sitofp(builder.sub(builder.lshr(nib, c4), c8), V_F32)
                k = builder.add(builder.mul(g, G64), builder.mul(t, ir.Constant(I64, 16)))
                x_lo = _vector_at(builder, x_base, k, V_F32, 4)
                x_hi = _vector_at(builder, x_base, builder.add(k, half), V_F32, 4)
                prod = builder.fadd(
                    builder.fmul(lo, x_lo, flags=FAST),
                    builder.fmul(hi, x_hi, flags=FAST),
                    flags=FAST,
                )
                builder.store(builder.fadd(builder.load(part_ptr), prod, flags=FAST), part_ptr)
            bits = builder.zext(builder.load(builder.gep(s_base, [g])), I32)
            scale = _splat(builder, builder.bitcast(builder.shl(bits, ir.Constant(I32, 16)), F32))
            scaled = builder.fmul(builder.load(part_ptr), scale, flags=FAST)
            builder.store(builder.fadd(builder.load(acc_ptr), scaled, flags=FAST), acc_ptr)
        acc = builder.load(acc_ptr)
        total = builder.extract_element(acc, ir.Constant(I32, 0))
        for i in range(1, 16):
            total = builder.fadd(
                total, builder.extract_element(acc, ir.Constant(I32, i)), flags=FAST
            )
        return total

    return types.float32(w, s, x, G), codegen


def row_dot(w, s, x, G):
    """sum_k w[k] * x[k] for one packed row w with its scales s (groups of G along k)."""


@overload(row_dot, jit_options={"fastmath": True})
def _row_dot(w, s, x, G):
    if w.dtype == types.uint16:

        def dot_bf16(w, s, x, G):
            acc = np.float32(0.0)
            for k in range(w.shape[0]):
                acc += bf16_to_f32(w[k]) * x[k]
            return acc

        return dot_bf16
    if w.dtype == types.int8:

        def dot_int8(w, s, x, G):
            acc = np.float32(0.0)
            for g in range(s.shape[0]):
                wg, xg = w[g * G : (g + 1) * G], x[g * G : (g + 1) * G]
                part = np.float32(0.0)
                for k in range(G):  # a loop from 0 over slices: LLVM vectorizes this form
                    part += np.float32(wg[k]) * xg[k]
                acc += part * s[g]
            return acc

        return dot_int8
    if w.dtype == types.uint8 and int4_simd_ok(w, s, x):

        def dot_int4_simd(w, s, x, G):
            return int4_row_dot(w, s, x, G)

        return dot_int4_simd
    if w.dtype == types.uint8:  # strided rows: the plain loop

        def dot_int4(w, s, x, G):
            half = G // 2
            acc = np.float32(0.0)
            for g in range(s.shape[0]):
                wg = w[g * half : (g + 1) * half]
                xlo, xhi = x[g * G : g * G + half], x[g * G + half : (g + 1) * G]
                part = np.float32(0.0)
                for j in range(half):
                    b = np.int32(wg[j])
                    part += np.float32((b & 15) - 8) * xlo[j] + np.float32((b >> 4) - 8) * xhi[j]
                acc += part * bf16_to_f32(s[g])
            return acc

        return dot_int4
    return None


@njit(**JIT)
def split_parts(ids, weights, rows, deferred):
    """A job's parts: ids [T, k] router experts (-1: none) -> parts [n, T, k] engine rows (-1:
    not in that part). rows [E]: each expert's engine row (-1: computed elsewhere). With
    `deferred` d != 0 (n = 2), part 1 holds each token's |d| lowest-weight slots that have a
    row (between equal weights, the earlier slot), part 0 the rest; else n = 1.

    d > 0 shares reads: a slot whose expert part 0 computes anyway (for another token) stays in
    part 0, so no expert is read twice in one job and part 1 holds only experts that every
    token using them deferred. d < 0 defers per token whatever the others do (what each token
    would see alone, at batch 1: `hetero eval` scores deferral so)."""
    T, k = ids.shape
    d = deferred if deferred > 0 else -deferred
    parts = np.full((2 if d > 0 else 1, T, k), -1, np.int64)
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= rows.shape[0]:
                raise ValueError("an expert id is out of range of the rows map")
            if ids[t, j] >= 0:
                parts[0, t, j] = rows[ids[t, j]]
        for _ in range(min(d, k)):
            low = -1
            for j in range(k):
                if parts[0, t, j] >= 0 and (low < 0 or weights[t, j] < weights[t, low]):
                    low = j
            if low < 0:
                break
            parts[1, t, low], parts[0, t, low] = parts[0, t, low], -1
    if deferred > 0 and T > 1:
        now = np.zeros(max(rows.max() + 1, 1), np.bool_)  # by engine row: part 0 reads it
        for t in range(T):
            for j in range(k):
                if parts[0, t, j] >= 0:
                    now[parts[0, t, j]] = True
        for t in range(T):
            for j in range(k):
                r = parts[1, t, j]
                if r >= 0 and now[r]:
                    parts[0, t, j], parts[1, t, j] = r, -1
    return parts


@njit(**JIT)
def group_by_expert(ids, num_experts):
    """Sorts the (token, slot) pairs of ids [T, k] by expert; ids < 0 are skipped.

    Returns experts [A] (the active ones), ptr [A+1] (their pair ranges), pair_token [P],
    pair_slot [P] (which of the token's k), pos [T, k] (pair index of each slot, -1 if skipped).
    """
    T, k = ids.shape
    counts = np.zeros(num_experts, np.int64)
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= 0:
                counts[ids[t, j]] += 1
    A = 0
    for e in range(num_experts):
        A += counts[e] > 0
    experts = np.empty(A, np.int64)
    ptr = np.zeros(A + 1, np.int64)
    start = np.empty(num_experts, np.int64)
    a = 0
    for e in range(num_experts):
        if counts[e] > 0:
            experts[a] = e
            start[e] = ptr[a]
            ptr[a + 1] = ptr[a] + counts[e]
            a += 1
    P = ptr[A]
    pair_token = np.empty(P, np.int64)
    pair_slot = np.empty(P, np.int64)
    pos = np.full((T, k), -1, np.int64)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                p = start[e]
                start[e] += 1
                pair_token[p], pair_slot[p], pos[t, j] = t, j, p
    return experts, ptr, pair_token, pair_slot, pos


@njit(parallel=True, **JIT)
def moe_gemv(x, weights, experts, ptr, pair_token, pair_slot, pos, w13, s13, w2, s2, out, rows):
    """The routed experts of one layer, GEMV style: each expert's rows are read once per call
    and applied to each of its (few) tokens while in L1.

    x [T, H] f32, weights [T, k] f32, grouping from `group_by_expert`, packed w13 [E, I, 2, .],
    s13 [E, I, 2, H/G13], w2 [E, H, .], s2 [E, H, I/G2]; out [T, H] f32 is overwritten.
    `rows`: rows of one matrix a thread takes at a time (16 x 7168 int8 = 112 KB).
    """
    T, H = x.shape
    A, I, P = experts.shape[0], w13.shape[1], pair_token.shape[0]
    G13 = H // max(s13.shape[3], 1)
    G2 = I // max(s2.shape[2], 1)
    h = np.empty((P, I), np.float32)  # silu(gate) * up of each pair
    y = np.empty((P, H), np.float32)  # weighted down_proj output of each pair
    nb = (I + rows - 1) // rows
    for item in prange(A * nb):
        a, r0 = item // nb, (item % nb) * rows
        e = experts[a]
        for r in range(r0, min(r0 + rows, I)):
            for p in range(ptr[a], ptr[a + 1]):
                xt = x[pair_token[p]]
                g = row_dot(w13[e, r, 0], s13[e, r, 0], xt, G13)
                u = row_dot(w13[e, r, 1], s13[e, r, 1], xt, G13)
                h[p, r] = g / (np.float32(1.0) + np.exp(-g)) * u
    nb = (H + rows - 1) // rows
    for item in prange(A * nb):
        a, r0 = item // nb, (item % nb) * rows
        e = experts[a]
        for r in range(r0, min(r0 + rows, H)):
            for p in range(ptr[a], ptr[a + 1]):
                wt = weights[pair_token[p], pair_slot[p]]
                y[p, r] = row_dot(w2[e, r], s2[e, r], h[p], G2) * wt
    combine(pos, y, out)


@njit(parallel=True, **JIT)
def copy_bytes(src, dst):
    """dst[:] = src for uint8 arrays [N], by all threads (one core copies at ~10 GB/s)."""
    n, chunk = src.shape[0], 1 << 20
    for c in prange((n + chunk - 1) // chunk):
        dst[c * chunk : min((c + 1) * chunk, n)] = src[c * chunk : min((c + 1) * chunk, n)]


@njit(parallel=True, **JIT)
def combine(pos, y, out, add=False):
    """out[t] = sum of y over the pairs of token t (pos [T, k], -1 for skipped slots); with
    `add`, out[t] += that sum."""
    T, k = pos.shape
    for t in prange(T):
        o = out[t]
        if not add:
            o[:] = 0.0
        for j in range(k):
            if pos[t, j] >= 0:
                yj = y[pos[t, j]]
                for h in range(o.shape[0]):  # (a loop: `o += yj` measured 1.5x slower)
                    o[h] += yj[h]


@njit(parallel=True, **JIT)
def dequantize_rows(w, s, out):
    """Packed rows w [R, .] with scales s [R, K/G] -> bf16 bits out [R, K] (for the GEMM path)."""
    R, K = out.shape
    G = K // max(s.shape[1], 1)
    for r in prange(R):
        row_dequant(w[r], s[r], out[r], G)


def row_dequant(w, s, out, G):
    """out[k] = bf16 bits of the k-th weight of packed row w."""


@overload(row_dequant, jit_options={"fastmath": True})
def _row_dequant(w, s, out, G):
    if w.dtype == types.uint16:

        def copy_bf16(w, s, out, G):
            out[:] = w

        return copy_bf16
    if w.dtype == types.int8:

        def dequant_int8(w, s, out, G):
            for g in range(s.shape[0]):
                wg, og, sg = w[g * G : (g + 1) * G], out[g * G : (g + 1) * G], s[g]
                for k in range(G):
                    og[k] = _to_bf16_bits(np.float32(wg[k]) * sg)

        return dequant_int8
    if w.dtype == types.uint8:

        def dequant_int4(w, s, out, G):
            half = G // 2
            for g in range(s.shape[0]):
                sc = bf16_to_f32(s[g])
                wg = w[g * half : (g + 1) * half]
                olo, ohi = out[g * G : g * G + half], out[g * G + half : (g + 1) * G]
                for j in range(half):
                    b = np.int32(wg[j])
                    olo[j] = _to_bf16_bits(np.float32((b & 15) - 8) * sc)
                    ohi[j] = _to_bf16_bits(np.float32((b >> 4) - 8) * sc)

        return dequant_int4
    return None


@intrinsic
def _bits_from_f32(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always", **JIT)
def _to_bf16_bits(f):
    """fp32 -> bf16 bits, round to nearest even (values here are finite)."""
    b = np.uint32(_bits_from_f32(f))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16)
