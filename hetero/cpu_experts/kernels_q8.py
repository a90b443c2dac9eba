"""numba kernels of int4 and int8 experts on int8 activations (AVX-512 VNNI where the CPU has it).

Why: with fp32 activations each int4 weight costs an unpack, an int->float conversion and an FMA,
so a Xeon core consumes ~7 G weights/s and 16 cores cannot keep up with RAM. Quantizing the
activations to int8 (a scale per 128 of K, as llama.cpp's Q8 blocks) turns the row dot into
`vpdpbusd`: 64 nibble x int8 products a instruction into 16 int32 lanes, one int->float
conversion and one FMA per 128 weights.

Layout. A packed int4 row (formats.py) stores byte j of group g as w[g*G + j] | w[g*G + G/2 + j]
<< 4. A 64-byte block of the row thus holds 128 consecutive k; the activations are stored in the
same order: per block, 64 int8 for the low nibbles, then 64 for the high ones. A 32-bit lane of a
block covers 4 bytes, i.e. 8 weights of one scale group; the nibbles are unsigned (q + 8), so each
lane starts from -8 * (sum of its 8 activations), precomputed once per token.

int8 rows (a scale per row or per 128 of K) take the same path with the activations in natural
order: a block's two 64-byte halves are XORed with 0x80 (w + 128, unsigned), so each lane starts
from -128 * (sum of its 8 activations).

Self-contained on purpose: numba's disk cache is keyed by the defining file only.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

JIT = {"nogil": True, "fastmath": True, "cache": True}
BLOCK = 128  # k per activation scale and per 64-byte block of a packed int4 row
LINE = 16  # int64s between two atomic counters: each on its own cache line (and prefetch pair)

I8, I16, I32, I64 = (ir.IntType(n) for n in (8, 16, 32, 64))
F32 = ir.FloatType()
V_B, V_I32, V_F32, V4_F32 = (
    ir.VectorType(I8, 64),
    ir.VectorType(I32, 16),
    ir.VectorType(F32, 16),
    ir.VectorType(F32, 4),
)


def has_vnni() -> bool:
    return "+avx512vnni" in llvm.get_host_cpu_features().flatten().split(",")


def _dot4(builder: ir.IRBuilder, acc: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    """acc[l] + sum_{i<4} a[4l+i] * b[4l+i] for unsigned bytes a and signed bytes b (vpdpbusd)."""
    if has_vnni():
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(V_I32, [V_I32, V_I32, V_I32]),
            "llvm.x86.avx512.vpdpbusd.512",
        )
        return builder.call(fn, [acc, builder.bitcast(a, V_I32), builder.bitcast(b, V_I32)])
    v64 = ir.VectorType(I32, 64)  # portable IR, same integers: LLVM picks the instructions
    prod = builder.mul(builder.zext(a, v64), builder.sext(b, v64))
    for i in range(4):
        lane = builder.shuffle_vector(
            prod, ir.Constant(v64, ir.Undefined), ir.Constant(V_I32, [4 * l + i for l in range(16)])
        )
        acc = builder.add(acc, lane)
    return acc


def _load(builder, base, offset, vty, align=1):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vty.as_pointer()), align=align)


def _is_row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 and a.dtype == dtype


def _emit_dots(builder, w_p, s_p, tokens, blocks, shift, int8: bool, ahead) -> list:
    """IR of the row dot for each token of `tokens` [(xq, xs, xa) pointers]: the row's bytes
    are unpacked and its scales widened once a block for all of them. `int8`: an int8 row with
    f32 scales (else packed int4 with bf16 scales). `ahead`: bytes past each line read that are
    prefetched into L2 (the next rows of the work item lie right after this one; 0: no use)."""
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0",
    )  # fmt: skip
    hint = [ir.Constant(I32, v) for v in (0, 2, 1)]  # read, L2, data
    accs = [cgutils.alloca_once_value(builder, ir.Constant(V_F32, [0.0] * 16)) for _ in tokens]
    c15, c4, c128 = (ir.Constant(V_B, [v] * 64) for v in (15, 4, 128))
    to16 = ir.Constant(V_I32, [c for c in range(4) for _ in range(4)])
    undef16 = ir.Constant(V_F32, ir.Undefined)
    with cgutils.for_range(builder, blocks) as loop:
        b = loop.index
        x0 = builder.mul(b, ir.Constant(I64, BLOCK))
        if int8:  # two 64-byte halves, made unsigned: w + 128
            lo = builder.xor(_load(builder, w_p, x0, V_B), c128)
            hi = builder.xor(_load(builder, w_p, builder.add(x0, ir.Constant(I64, 64)), V_B), c128)
            lines = [x0, builder.add(x0, ir.Constant(I64, 64))]
        else:
            line = builder.mul(b, ir.Constant(I64, 64))
            wv = _load(builder, w_p, line, V_B)
            lo, hi = builder.and_(wv, c15), builder.lshr(wv, c4)
            lines = [line]
        for line in lines:
            builder.call(prefetch, [builder.gep(w_p, [builder.add(line, ahead)]), *hint])
        sw = builder.shuffle_vector(
            _block_scales(builder, s_p, b, x0, shift, int8), ir.Constant(V4_F32, ir.Undefined), to16
        )
        for (xq_p, xs_p, xa_p), acc in zip(tokens, accs):
            xl = _load(builder, xq_p, x0, V_B)
            xh = _load(builder, xq_p, builder.add(x0, ir.Constant(I64, 64)), V_B)
            start = _load(builder, xa_p, builder.mul(b, ir.Constant(I64, 16)), V_I32, 4)
            dots = _dot4(builder, _dot4(builder, start, lo, xl), hi, xh)  # [16] i32
            sa = builder.insert_element(
                undef16, builder.load(builder.gep(xs_p, [b])), ir.Constant(I32, 0)
            )
            sa16 = builder.shuffle_vector(sa, undef16, ir.Constant(V_I32, [0] * 16))
            scale = builder.fmul(sw, sa16, flags=("fast",))
            term = builder.fmul(builder.sitofp(dots, V_F32), scale, flags=("fast",))
            builder.store(builder.fadd(builder.load(acc), term, flags=("fast",)), acc)
    totals = []
    for acc in accs:
        v = builder.load(acc)
        total = builder.extract_element(v, ir.Constant(I32, 0))
        for i in range(1, 16):
            total = builder.fadd(
                total, builder.extract_element(v, ir.Constant(I32, i)), flags=("fast",)
            )
        totals.append(total)
    return totals


def _block_scales(builder, s_p, b, x0, shift, int8: bool):
    """<4 x float>: the scale of each 32-k quarter of block b, s[(128 b + 32 c) >> gshift].
    The common groups get their own short paths (LLVM hoists the test out of the loop): group
    32 of int4 loads the four bf16 scales at once, group 128 and per-row scales splat one."""

    def widen(value, n):  # bf16 bits (i16 or <n x i16>) -> f32; f32 as is
        if int8:
            return value
        ty = I32 if n == 1 else ir.VectorType(I32, n)
        shifted = builder.shl(builder.zext(value, ty), ir.Constant(ty, 16) if n == 1 else
                              ir.Constant(ty, [16] * n))  # fmt: skip
        return builder.bitcast(shifted, F32 if n == 1 else ir.VectorType(F32, n))

    def splat(f):
        v = builder.insert_element(ir.Constant(V4_F32, ir.Undefined), f, ir.Constant(I32, 0))
        return builder.shuffle_vector(
            v, ir.Constant(V4_F32, ir.Undefined), ir.Constant(ir.VectorType(I32, 4), [0] * 4)
        )

    def generic():
        quarter = ir.Constant(V4_F32, ir.Undefined)
        for c in range(4):
            k = builder.add(x0, ir.Constant(I64, 32 * c))
            f = widen(builder.load(builder.gep(s_p, [builder.lshr(k, shift)])), 1)
            quarter = builder.insert_element(quarter, f, ir.Constant(I32, c))
        return quarter

    cases = [
        (builder.icmp_unsigned(">=", shift, ir.Constant(I64, 62)),
         lambda: splat(widen(builder.load(s_p), 1))),  # one scale a row
        (builder.icmp_unsigned("==", shift, ir.Constant(I64, 7)),
         lambda: splat(widen(builder.load(builder.gep(s_p, [b])), 1))),  # group 128
    ]  # fmt: skip
    if not int8:  # int4 group 32: the block's four scales are adjacent
        four = ir.VectorType(I16, 4)
        at = builder.bitcast(
            builder.gep(s_p, [builder.mul(b, ir.Constant(I64, 4))]), four.as_pointer()
        )
        cases.append((builder.icmp_unsigned("==", shift, ir.Constant(I64, 5)),
                      lambda: widen(builder.load(at, align=2), 4)))  # fmt: skip
    return _select(builder, cases, generic)


def _select(builder, cases, otherwise):
    """The value of the first case whose condition holds, else otherwise(): branches and a phi,
    so each path's loads happen only where they are in bounds."""
    if not cases:
        return otherwise()
    (cond, make), rest = cases[0], cases[1:]
    with builder.if_else(cond) as (then, other):
        with then:
            a = make()
            a_block = builder.block
        with other:
            b = _select(builder, rest, otherwise)
            b_block = builder.block
    phi = builder.phi(a.type)
    phi.add_incoming(a, a_block)
    phi.add_incoming(b, b_block)
    return phi


def _i64(builder, v):
    return builder.sext(v, I64) if v.type.width < 64 else v


def _weights_kind(w, s) -> bool | None:
    """int8 (True) or packed int4 (False) rows by their arrays' dtypes; None if neither."""
    if _is_row(w, types.uint8) and _is_row(s, types.uint16):
        return False
    if _is_row(w, types.int8) and _is_row(s, types.float32):
        return True
    return None


def _is_table(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.layout == "C" and a.ndim == 2 and a.dtype == dtype


@intrinsic
def q8_row_dot(typingctx, w, s, xq, xs, xa, gshift, ahead):
    """sum_k w[k] x[k] for one row: packed int4 w [K/2] u8 with bf16 scales s [K/G], or int8
    w [K] with f32 scales s [K/G] (G = 1 << gshift), against activations as `quantize_row`
    leaves them: xq [K] i8, xs [K/128] f32, xa [K/128 * 16] i32."""
    int8 = _weights_kind(w, s)
    acts = ((xq, types.int8), (xs, types.float32), (xa, types.int32))
    if int8 is None or not all(_is_row(a, d) for a, d in acts):
        return None
    if not (isinstance(gshift, types.Integer) and isinstance(ahead, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        w_a, s_a, xq_a, xs_a, xa_a = (
            context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:5], args[:5])
        )
        token = (
            builder.bitcast(xq_a.data, I8.as_pointer()),
            builder.bitcast(xs_a.data, F32.as_pointer()),
            builder.bitcast(xa_a.data, I32.as_pointer()),
        )
        w_p = builder.bitcast(w_a.data, I8.as_pointer())
        s_p = builder.bitcast(s_a.data, (F32 if int8 else I16).as_pointer())
        blocks = builder.extract_value(xs_a.shape, 0)
        shift, far = _i64(builder, args[5]), _i64(builder, args[6])
        return _emit_dots(builder, w_p, s_p, [token], blocks, shift, int8, far)[0]

    return types.float32(w, s, xq, xs, xa, gshift, ahead), codegen


@intrinsic
def q8_row_dot4(typingctx, w, s, xq, xs, xa, t0, t1, t2, t3, gshift, ahead):
    """`q8_row_dot` of one row against 4 tokens at once (rows t0..t3 of xq [T, K] i8, xs [T,
    K/128] f32, xa [T, K/128 * 16] i32): the row is unpacked once for all four."""
    int8 = _weights_kind(w, s)
    acts = ((xq, types.int8), (xs, types.float32), (xa, types.int32))
    if int8 is None or not all(_is_table(a, d) for a, d in acts):
        return None
    if not all(isinstance(t, types.Integer) for t in (t0, t1, t2, t3, gshift, ahead)):
        return None
    ret = types.UniTuple(types.float32, 4)

    def codegen(context, builder, sig, args):
        w_a, s_a, xq_a, xs_a, xa_a = (
            context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:5], args[:5])
        )
        rows = [builder.extract_value(a.shape, 1) for a in (xq_a, xs_a, xa_a)]
        bases = (
            builder.bitcast(xq_a.data, I8.as_pointer()),
            builder.bitcast(xs_a.data, F32.as_pointer()),
            builder.bitcast(xa_a.data, I32.as_pointer()),
        )
        tokens = []
        for t in args[5:9]:
            t = _i64(builder, t)
            tokens.append(tuple(builder.gep(p, [builder.mul(t, n)]) for p, n in zip(bases, rows)))
        w_p = builder.bitcast(w_a.data, I8.as_pointer())
        s_p = builder.bitcast(s_a.data, (F32 if int8 else I16).as_pointer())
        shift, far = _i64(builder, args[9]), _i64(builder, args[10])
        totals = _emit_dots(builder, w_p, s_p, tokens, rows[1], shift, int8, far)
        return context.make_tuple(builder, ret, totals)

    return ret(w, s, xq, xs, xa, t0, t1, t2, t3, gshift, ahead), codegen


@intrinsic
def atomic_add(typingctx, a, i, v):
    """a[i] += v as one atomic step (sequentially consistent); the value before. a: int64 [n]."""
    if not (_is_row(a, types.int64) and isinstance(i, types.Integer)):
        return None
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        at = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                         [_i64(builder, args[1])])  # fmt: skip
        return builder.atomic_rmw("add", at, _i64(builder, args[2]), "seq_cst")

    return types.int64(a, i, v), codegen


@intrinsic
def atomic_load(typingctx, a, i):
    """a[i], read atomically (acquire: what its writer did before its release is visible)."""
    if not (_is_row(a, types.int64) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        at = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                         [_i64(builder, args[1])])  # fmt: skip
        return builder.load_atomic(at, "acquire", 8)

    return types.int64(a, i), codegen


@intrinsic
def spin_pause(typingctx):
    """x86's `pause` in a spin loop (spares the sibling hyperthread and the memory bus)."""

    def codegen(context, builder, sig, args):
        if llvm.get_process_triple().startswith(("x86_64", "i686")):
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def cycle_counter(typingctx):
    """The CPU's cycle counter (rdtsc on x86): cheap timestamps inside a kernel."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(I64, []), "llvm.readcyclecounter"
        )
        return builder.call(fn, [])

    return types.int64(), codegen


@njit(**JIT)
def read_cycles():
    return cycle_counter()


@njit(**JIT)
def quantize_row(x, gshift, offset, xq, xs, xa):
    """x [K] f32 -> int8 in the block order of a packed int4 row of group 1 << gshift.

    xq [K] i8: per block of 128 k, the values under its 64 low nibbles, then its 64 high ones;
    xs [K/128] f32: the block scales (amax / 127); xa [K/128 * 16] i32: each lane's start value,
    -offset * the sum of the 8 activations it multiplies (the weights' unsigned offset: 8 for
    int4 nibbles, 128 for int8, whose order is natural: gshift 7)."""
    half = (1 << gshift) // 2
    for blk in range(xs.shape[0]):
        xb = x[blk * BLOCK : (blk + 1) * BLOCK]
        amax = np.float32(0.0)
        for i in range(BLOCK):
            amax = max(amax, abs(xb[i]))
        scale = amax / np.float32(127.0)
        inv = np.float32(1.0) / scale if amax > 0 else np.float32(0.0)
        xs[blk] = scale
        qb = xq[blk * BLOCK : (blk + 1) * BLOCK]
        for i in range(64):
            byte = blk * 64 + i
            g = byte // half
            k = g * 2 * half + byte - g * half  # the low nibble's k; the high one's is k + half
            qb[i] = np.int8(np.rint(x[k] * inv))
            qb[64 + i] = np.int8(np.rint(x[k + half] * inv))
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
        while True:
            t = atomic_add(state, 0, 1)
            if t >= T:
                break
            quantize_row(x[t], q13, offset, xq[t], xs[t], xa[t])
            atomic_add(state, LINE, 1)
        while atomic_load(state, LINE) < T:
            spin_pause()
        for v in range(j, j + n):  # own range first, then the others'
            v %= n
            lo, hi = A * nb1 * v // n, A * nb1 * (v + 1) // n
            i = lo + atomic_add(state, LINE * (2 + A + v), 1)
            while i < hi:
                a, r0 = i // nb1, i % nb1 * rows
                _gate_up(w13[experts[a]], s13[experts[a]], xq, xs, xa, pair_token, ptr[a],
                         ptr[a + 1], r0, min(r0 + rows, I), h, sh13, ahead)  # fmt: skip
                if atomic_add(state, LINE * (2 + a), 1) == nb1 - 1:  # the expert's last item
                    for p in range(ptr[a], ptr[a + 1]):
                        quantize_row(h[p], q2, offset, hq[p], hs[p], ha[p])
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
                _down(w2[experts[a]], s2[experts[a]], hq, hs, ha, weights, pair_token, pair_slot,
                      ptr[a], ptr[a + 1], r0, min(r0 + rows2, H), y, sh2, ahead)  # fmt: skip
                i = lo + atomic_add(state, LINE * (2 + A + n + v), 1)


@njit(inline="always", **JIT)
def _gate_up(w13, s13, xq, xs, xa, pair_token, start, end, r0, r1, h, sh, ahead):
    """h[p, r] = silu(gate_r x_t) * up_r x_t for the expert's pairs p in [start, end), t their
    tokens, rows r in [r0, r1) of w13 [I, 2, .]."""
    for r in range(r0, r1):
        wg, sg, wu, su = w13[r, 0], s13[r, 0], w13[r, 1], s13[r, 1]
        p = start
        while p + 4 <= end:  # four tokens a pass over the row: it is unpacked once
            t0, t1, t2, t3 = pair_token[p], pair_token[p + 1], pair_token[p + 2], pair_token[p + 3]
            g = q8_row_dot4(wg, sg, xq, xs, xa, t0, t1, t2, t3, sh, ahead)
            u = q8_row_dot4(wu, su, xq, xs, xa, t0, t1, t2, t3, sh, ahead)
            for j in range(4):
                h[p + j, r] = _silu_mul(g[j], u[j])
            p += 4
        for q in range(p, end):
            t = pair_token[q]
            g1 = q8_row_dot(wg, sg, xq[t], xs[t], xa[t], sh, ahead)
            h[q, r] = _silu_mul(g1, q8_row_dot(wu, su, xq[t], xs[t], xa[t], sh, ahead))


@njit(inline="always", **JIT)
def _down(w2, s2, hq, hs, ha, weights, pair_token, pair_slot, start, end, r0, r1, y, sh, ahead):
    """y[p, r] = weight_p * (down_r h_p) for pairs p in [start, end), rows [r0, r1) of w2 [H, .]."""
    for r in range(r0, r1):
        wd, sd = w2[r], s2[r]
        p = start
        while p + 4 <= end:
            d = q8_row_dot4(wd, sd, hq, hs, ha, p, p + 1, p + 2, p + 3, sh, ahead)
            for j in range(4):
                y[p + j, r] = d[j] * weights[pair_token[p + j], pair_slot[p + j]]
            p += 4
        for q in range(p, end):
            wt = weights[pair_token[q], pair_slot[q]]
            y[q, r] = q8_row_dot(wd, sd, hq[q], hs[q], ha[q], sh, ahead) * wt


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
