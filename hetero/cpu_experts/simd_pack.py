"""The LLVM IR of the activations' packing for the CPU kernels, as numba intrinsics: a block's
absolute maximum, and 16 tokens' rows put side by side in 32-bit words (AMX B tiles' order).

Why: numba's loop `amax = max(amax, abs(x[i]))` stays scalar (one `vmaxss` a value: a max
reduction is not reassociated), and it took most of the activations' quantization; so did
writing each token's bytes 64 apart. Here the maximum is 8 vector maxima and one reduction a
128-value block, and the interleave a 16 x 16 transpose of words in registers. The results are
the loops' own, bit for bit (a maximum is exact in any order).

numba's disk cache is keyed by the defining file only: the kernels that compile these in name
this file's hash in their DEPENDS (a test checks it).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hetero.cpu_experts.simd_sync import as_i64, is_row

BLOCK = 128  # values a block (the activations' scale block)
W = 16  # words a transposed row, and rows (tokens) side by side

I32, I64, F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
V_F32, V_I32 = ir.VectorType(F32, 16), ir.VectorType(I32, 16)


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


@intrinsic
def block_amax(typingctx, x, start):
    """max |x[start : start + 128]| of the f32 row x."""
    if not (is_row(x, types.float32) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        base = builder.gep(
            _data(context, builder, sig.args[0], args[0]), [as_i64(builder, args[1])]
        )
        module = builder.module
        fabs = cgutils.get_or_insert_function(module, ir.FunctionType(V_F32, [V_F32]),
                                              "llvm.fabs.v16f32")  # fmt: skip
        most = cgutils.get_or_insert_function(module, ir.FunctionType(V_F32, [V_F32, V_F32]),
                                              "llvm.maxnum.v16f32")  # fmt: skip
        reduce = cgutils.get_or_insert_function(module, ir.FunctionType(F32, [V_F32]),
                                                "llvm.vector.reduce.fmax.v16f32")  # fmt: skip
        acc = None
        for j in range(BLOCK // 16):
            at = builder.bitcast(builder.gep(base, [I64(16 * j)]), V_F32.as_pointer())
            v = builder.call(fabs, [builder.load(at, align=4)])
            acc = v if acc is None else builder.call(most, [acc, v])
        return builder.call(reduce, [acc])

    return types.float32(x, start), codegen


def _transpose_masks() -> list[tuple[int, list[int], list[int]]]:
    """The butterfly stages of a 16 x 16 transpose: (b, mask of row j, mask of row j + b) for
    b = 8, 4, 2, 1, rows j with j & b == 0 (shufflevector indices: 16.. pick the second row)."""
    stages = []
    for b in (8, 4, 2, 1):
        low = [p if p & b == 0 else W + p - b for p in range(W)]
        high = [p + b if p & b == 0 else W + p for p in range(W)]
        stages.append((b, low, high))
    return stages


@intrinsic
def interleave16(typingctx, rows, n, col, out, at):
    """out[at + 16 j + m] = rows[m * n + col + j] for m, j < 16: words col.. of 16 rows n words
    long (rows, out: int32, flat), each word of a row beside the same word of the others."""
    if not (is_row(rows, types.int32) and is_row(out, types.int32)):
        return None
    if not all(isinstance(t, types.Integer) for t in (n, col, at)):
        return None

    def codegen(context, builder, sig, args):
        src = _data(context, builder, sig.args[0], args[0])
        dst = _data(context, builder, sig.args[3], args[3])
        n_, col_, at_ = (as_i64(builder, args[i]) for i in (1, 2, 4))
        r = []
        for m in range(W):
            p = builder.gep(src, [builder.add(builder.mul(n_, I64(m)), col_)])
            r.append(builder.load(builder.bitcast(p, V_I32.as_pointer()), align=4))
        for b, low, high in _transpose_masks():
            lo, hi = (
                ir.Constant(ir.VectorType(I32, W), low),
                ir.Constant(ir.VectorType(I32, W), high),
            )
            for j in range(W):
                if j & b == 0:
                    r[j], r[j + b] = (builder.shuffle_vector(r[j], r[j + b], lo),
                                      builder.shuffle_vector(r[j], r[j + b], hi))  # fmt: skip
        for j in range(W):
            p = builder.gep(dst, [builder.add(at_, I64(W * j))])
            builder.store(r[j], builder.bitcast(p, V_I32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(rows, n, col, out, at), codegen
