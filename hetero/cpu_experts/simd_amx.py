"""The LLVM IR of kernels_amx's vector work around the tiles: unpacking int4 rows into A tiles'
bytes, prefetching the 16 rows an item reads side by side, and rescaling a C tile's int32 sums
into the f32 accumulators. numba's disk cache is keyed by the defining file only: kernels_amx's
DEPENDS names this file's hash (a test checks it)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TM = 16  # tokens a B tile, rows an A tile (and of a C tile)

I8, I32, I64, F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout in "CA" and a.dtype == dtype


def _vec(builder, ptr, offset, n, ty):
    """A <n x ty> pointer `offset` elements past ptr."""
    return builder.bitcast(builder.gep(ptr, [offset]), ir.VectorType(ty, n).as_pointer())


def _splat(builder, f):
    """<16 x float> of the float f."""
    v16 = ir.VectorType(F32, 16)
    one = builder.insert_element(ir.Constant(v16, ir.Undefined), f, I32(0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, 16), [0] * 16))


@intrinsic
def unpack_rows(typingctx, w, start, rowb, ab, rr):
    """ab [16, rr] u8 = the 16 int4 rows' groups from byte `start` of w (rows `rowb` bytes
    apart), one group of rr k a row: its low nibbles, then its high ones (rr: 32, 64 or 128)."""
    if not ((_row(w, types.uint8) or _row(w, types.int8)) and _row(ab, types.uint8)):
        return None  # (int8 rows type-check here too: the kernels branch on the format)
    if not all(isinstance(t, types.Integer) for t in (start, rowb, rr)):
        return None

    def codegen(context, builder, sig, args):
        w_p, ab_p = (
            builder.bitcast(context.make_array(t)(context, builder, a).data, I8.as_pointer())
            for t, a in ((sig.args[0], args[0]), (sig.args[3], args[3]))
        )
        start_, rowb_, rr_ = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 4)
        )
        end = builder.append_basic_block("unpacked")
        switch = builder.switch(rr_, end)
        for half in (16, 32, 64):
            block = builder.append_basic_block(f"half{half}")
            switch.add_case(I64(2 * half), block)
            builder.position_at_end(block)
            bytes_ = ir.VectorType(I8, half)
            low, four = ir.Constant(bytes_, [15] * half), ir.Constant(bytes_, [4] * half)
            for r in range(TM):
                src = builder.add(start_, builder.mul(rowb_, I64(r)))
                v = builder.load(_vec(builder, w_p, src, half, I8), align=1)
                for part, value in enumerate((builder.and_(v, low), builder.lshr(v, four))):
                    dst = _vec(builder, ab_p, I64((2 * r + part) * half), half, I8)
                    builder.store(value, dst, align=1)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return types.none(w, start, rowb, ab, rr), codegen


@intrinsic
def prefetch_rows(typingctx, a, start, stride):
    """Prefetches (into L2) the line at byte `start` of a and those 15 more `stride` bytes apart."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None
    if not (isinstance(start, types.Integer) and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        base = builder.bitcast(data, I8.as_pointer())
        start_, stride_ = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2))
        for r in range(TM):
            at = builder.gep(base, [builder.add(start_, builder.mul(stride_, I64(r)))])
            builder.call(fn, [at, I32(0), I32(2), I32(1)])  # read, L2, data
        return context.get_dummy_value()

    return types.none(a, start, stride), codegen


@intrinsic
def rescale(typingctx, cbuf, acc, xs, xsum, sw, offset):
    """acc [16 x 16] += (C - offset * xsum) * sw[row] * xs[token] for the int32 C tile cbuf
    [16 x 16] (rows x tokens): xs [16] f32, xsum [16] i32, sw [16] f32."""
    rows = ((cbuf, types.int32), (acc, types.float32), (xs, types.float32))
    if not all(_row(a, d) for a, d in rows + ((xsum, types.int32), (sw, types.float32))):
        return None
    if not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        c_p, acc_p, xs_p, xsum_p, sw_p = (
            context.make_array(t)(context, builder, a).data for t, a in zip(sig.args[:5], args[:5])
        )
        fast = ("fast",)
        v16 = ir.VectorType(F32, 16)
        xs_v = builder.load(_vec(builder, xs_p, I64(0), 16, F32), align=4)
        sums = builder.sitofp(builder.load(_vec(builder, xsum_p, I64(0), 16, I32), align=4), v16)
        off_v = _splat(builder, context.cast(builder, args[5], sig.args[5], types.float32))
        corr = builder.fmul(builder.fmul(sums, off_v, flags=fast), xs_v, flags=fast)
        for n in range(TM):
            c = builder.sitofp(builder.load(_vec(builder, c_p, I64(16 * n), 16, I32), align=4), v16)
            t = builder.fsub(builder.fmul(c, xs_v, flags=fast), corr, flags=fast)
            s_v = _splat(builder, builder.load(builder.gep(sw_p, [I64(n)])))
            at = _vec(builder, acc_p, I64(16 * n), 16, F32)
            new = builder.fadd(
                builder.load(at, align=4), builder.fmul(t, s_v, flags=fast), flags=fast
            )
            builder.store(new, at, align=4)
        return context.get_dummy_value()

    return types.none(cbuf, acc, xs, xsum, sw, offset), codegen
