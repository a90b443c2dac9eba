"""The LLVM IR of kernels_q8's inner loops, written with llvmlite as numba intrinsics: the int8 x
(int4 | int8) row dots (`vpdpbusd` where the CPU has AVX-512 VNNI). The atomics, `pause` and
cycle counter of its dataflow schedule and the engine's input wait are simd_sync.py's.

Layout. A packed int4 row (formats.py) stores byte j of group g as w[g*G + j] | w[g*G + G/2 + j]
<< 4. A 64-byte block of the row thus holds 128 consecutive k; the activations are stored in the
same order: per block, 64 int8 for the low nibbles, then 64 for the high ones. A 32-bit lane of a
block covers 4 bytes, i.e. 8 weights of one scale group; the nibbles are unsigned (q + 8), so each
lane starts from -8 * (sum of its 8 activations), precomputed once per token.

int8 rows (a scale per row or per 128 of K) take the same path with the activations in natural
order: a block's two 64-byte halves are XORed with 0x80 (w + 128, unsigned), so each lane starts
from -128 * (sum of its 8 activations).

numba's disk cache is keyed by the defining file only, and these intrinsics are compiled into
kernels_q8's and fused's cached kernels: their DEPENDS name this file's hash (a test checks it),
so changing this file means changing those lines, which rebuilds the caches.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hetero.cpu_experts.simd_sync import as_i64, is_row

BLOCK = 128  # k per activation scale and per 64-byte block of a packed int4 row

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


def _emit_dots(builder, rows, tokens, blocks, shift, int8: bool, ahead) -> list:
    """IR of the row dots of each row of `rows` [(w, s) pointers] with each token of `tokens`
    [(xq, xs, xa) pointers], row-major ([r0 t0, r0 t1, .., r1 t0, ..]): a row's bytes are
    unpacked and its scales widened once a block for all tokens, and a token's activations
    loaded once a block for all rows. `int8`: int8 rows with f32 scales (else packed int4
    with bf16 scales). `ahead`: bytes past each line read that are prefetched into L2 (the next
    rows of the work item lie right after this one; 0: no use)."""
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0",
    )  # fmt: skip
    hint = [ir.Constant(I32, v) for v in (0, 2, 1)]  # read, L2, data
    zero = ir.Constant(V_F32, [0.0] * 16)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in tokens] for _ in rows]
    c15, c4, c128 = (ir.Constant(V_B, [v] * 64) for v in (15, 4, 128))
    to16 = ir.Constant(V_I32, [c for c in range(4) for _ in range(4)])
    undef16 = ir.Constant(V_F32, ir.Undefined)
    with cgutils.for_range(builder, blocks) as loop:
        b = loop.index
        x0 = builder.mul(b, ir.Constant(I64, BLOCK))
        unpacked = []  # (lo, hi, scales [16]) of each row's block
        for w_p, s_p in rows:
            if int8:  # two 64-byte halves, made unsigned: w + 128
                lo = builder.xor(_load(builder, w_p, x0, V_B), c128)
                half = builder.add(x0, ir.Constant(I64, 64))
                hi = builder.xor(_load(builder, w_p, half, V_B), c128)
                lines = [x0, half]
            else:
                line = builder.mul(b, ir.Constant(I64, 64))
                wv = _load(builder, w_p, line, V_B)
                lo, hi = builder.and_(wv, c15), builder.lshr(wv, c4)
                lines = [line]
            for line in lines:
                builder.call(prefetch, [builder.gep(w_p, [builder.add(line, ahead)]), *hint])
            quarters = _block_scales(builder, s_p, b, x0, shift, int8)
            sw = builder.shuffle_vector(quarters, ir.Constant(V4_F32, ir.Undefined), to16)
            unpacked.append((lo, hi, sw))
        for j, (xq_p, xs_p, xa_p) in enumerate(tokens):
            xl = _load(builder, xq_p, x0, V_B)
            xh = _load(builder, xq_p, builder.add(x0, ir.Constant(I64, 64)), V_B)
            start = _load(builder, xa_p, builder.mul(b, ir.Constant(I64, 16)), V_I32, 4)
            sa = builder.insert_element(
                undef16, builder.load(builder.gep(xs_p, [b])), ir.Constant(I32, 0)
            )
            sa16 = builder.shuffle_vector(sa, undef16, ir.Constant(V_I32, [0] * 16))
            for (lo, hi, sw), acc in zip(unpacked, (row[j] for row in accs)):
                dots = _dot4(builder, _dot4(builder, start, lo, xl), hi, xh)  # [16] i32
                scale = builder.fmul(sw, sa16, flags=("fast",))
                term = builder.fmul(builder.sitofp(dots, V_F32), scale, flags=("fast",))
                builder.store(builder.fadd(builder.load(acc), term, flags=("fast",)), acc)
    totals = []
    for acc in (a for row in accs for a in row):
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
    32 of int4 loads the four bf16 scales at once, group 64 two, group 128 and per-row scales
    splat one."""

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
        # group 64: the block's two scales are adjacent, each for two quarters (the generic
        # path's four scalar loads made int4-g64 decode 5-12% slower than g32 on the H100
        # machine, though it reads 6% fewer bytes)
        two = ir.VectorType(I16, 2)
        at2 = builder.bitcast(
            builder.gep(s_p, [builder.mul(b, ir.Constant(I64, 2))]), two.as_pointer()
        )

        def pairs():
            v = widen(builder.load(at2, align=2), 2)
            return builder.shuffle_vector(
                v, ir.Constant(ir.VectorType(F32, 2), ir.Undefined),
                ir.Constant(ir.VectorType(I32, 4), [0, 0, 1, 1]),
            )  # fmt: skip

        cases.append((builder.icmp_unsigned("==", shift, ir.Constant(I64, 6)), pairs))
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


def _weights_kind(w, s) -> bool | None:
    """int8 (True) or packed int4 (False) rows by their arrays' dtypes; None if neither."""
    if is_row(w, types.uint8) and is_row(s, types.uint16):
        return False
    if is_row(w, types.int8) and is_row(s, types.float32):
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
    if int8 is None or not all(is_row(a, d) for a, d in acts):
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
        shift, far = as_i64(builder, args[5]), as_i64(builder, args[6])
        return _emit_dots(builder, [(w_p, s_p)], [token], blocks, shift, int8, far)[0]

    return types.float32(w, s, xq, xs, xa, gshift, ahead), codegen


def _typed_dots(ws, xq, xs, xa, ts, gshift, ahead):
    """Typing and codegen of `q8_row_dot` of the rows ws [(w, s) numba types] against len(ts)
    tokens at once (rows ts of xq [T, K] i8, xs [T, K/128] f32, xa [T, K/128 * 16] i32): each
    row is unpacked and its scales widened once for all tokens, each token's activations
    loaded once for all rows; a tuple of len(ws) * len(ts) f32, row-major."""
    n, kinds = len(ts), {_weights_kind(w, s) for w, s in ws}
    acts = ((xq, types.int8), (xs, types.float32), (xa, types.int32))
    if len(kinds) != 1 or None in kinds or not all(_is_table(a, d) for a, d in acts):
        return None
    if not all(isinstance(t, types.Integer) for t in (*ts, gshift, ahead)):
        return None
    int8, R = kinds.pop(), 2 * len(ws)
    ret = types.UniTuple(types.float32, len(ws) * n)

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in
                  zip(sig.args[: R + 3], args[: R + 3])]  # fmt: skip
        xq_a, xs_a, xa_a = arrays[R:]
        rows = [builder.extract_value(a.shape, 1) for a in (xq_a, xs_a, xa_a)]
        bases = (
            builder.bitcast(xq_a.data, I8.as_pointer()),
            builder.bitcast(xs_a.data, F32.as_pointer()),
            builder.bitcast(xa_a.data, I32.as_pointer()),
        )
        tokens = []
        for t in args[R + 3 : R + 3 + n]:
            t = as_i64(builder, t)
            tokens.append(tuple(builder.gep(p, [builder.mul(t, m)]) for p, m in zip(bases, rows)))
        weights = [
            (builder.bitcast(w_a.data, I8.as_pointer()),
             builder.bitcast(s_a.data, (F32 if int8 else I16).as_pointer()))
            for w_a, s_a in zip(arrays[0:R:2], arrays[1:R:2])
        ]  # fmt: skip
        shift, far = as_i64(builder, args[R + 3 + n]), as_i64(builder, args[R + 4 + n])
        totals = _emit_dots(builder, weights, tokens, rows[1], shift, int8, far)
        return context.make_tuple(builder, ret, totals)

    return ret(*(a for w_s in ws for a in w_s), xq, xs, xa, *ts, gshift, ahead), codegen


# two to four tokens of an expert share each unpacked block (batched decode: an expert has a
# few tokens, and re-unpacking its rows per token makes the cores, not RAM, the bound)
@intrinsic
def q8_row_dot2(typingctx, w, s, xq, xs, xa, t0, t1, gshift, ahead):
    """`q8_row_dot` of one row against tokens t0, t1 (`_typed_dots`)."""
    return _typed_dots([(w, s)], xq, xs, xa, (t0, t1), gshift, ahead)


@intrinsic
def q8_row_dot3(typingctx, w, s, xq, xs, xa, t0, t1, t2, gshift, ahead):
    """`q8_row_dot` of one row against tokens t0, t1, t2 (`_typed_dots`)."""
    return _typed_dots([(w, s)], xq, xs, xa, (t0, t1, t2), gshift, ahead)


@intrinsic
def q8_row_dot4(typingctx, w, s, xq, xs, xa, t0, t1, t2, t3, gshift, ahead):
    """`q8_row_dot` of one row against tokens t0..t3 (`_typed_dots`)."""
    return _typed_dots([(w, s)], xq, xs, xa, (t0, t1, t2, t3), gshift, ahead)


# two rows (an expert's gate and up rows, or two down rows) against one to four tokens: each
# token's activations are loaded once a block for both rows (with several tokens an expert the
# activations, not the weights, are most of a pass's loads: 4 tokens x 3 lines a block)
@intrinsic
def q8_pair_dot1(typingctx, w0, s0, w1, s1, xq, xs, xa, t0, gshift, ahead):
    """(row 0 . token t0, row 1 . t0) (`_typed_dots`)."""
    return _typed_dots([(w0, s0), (w1, s1)], xq, xs, xa, (t0,), gshift, ahead)


@intrinsic
def q8_pair_dot2(typingctx, w0, s0, w1, s1, xq, xs, xa, t0, t1, gshift, ahead):
    """Rows 0 and 1 against tokens t0, t1: (r0 t0, r0 t1, r1 t0, r1 t1) (`_typed_dots`)."""
    return _typed_dots([(w0, s0), (w1, s1)], xq, xs, xa, (t0, t1), gshift, ahead)


@intrinsic
def q8_pair_dot3(typingctx, w0, s0, w1, s1, xq, xs, xa, t0, t1, t2, gshift, ahead):
    """Rows 0 and 1 against tokens t0..t2, row-major (`_typed_dots`)."""
    return _typed_dots([(w0, s0), (w1, s1)], xq, xs, xa, (t0, t1, t2), gshift, ahead)


@intrinsic
def q8_pair_dot4(typingctx, w0, s0, w1, s1, xq, xs, xa, t0, t1, t2, t3, gshift, ahead):
    """Rows 0 and 1 against tokens t0..t3, row-major (`_typed_dots`)."""
    return _typed_dots([(w0, s0), (w1, s1)], xq, xs, xa, (t0, t1, t2, t3), gshift, ahead)
