"""numba intrinsics for the CPU kernels' dataflow schedules and the engine's waits, as LLVM IR:
int64 atomics (add, compare-and-swap, acquire load), x86's `pause` and the cycle counter; and
`borrowed`: arrays the threads of a parallel kernel index without a shared reference count.

numba's disk cache is keyed by the defining file only: the kernels that inline these name this
file's hash in their DEPENDS (tests/test_cpu_engine.py checks them).
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I64 = ir.IntType(64)


def is_row(a, dtype) -> bool:
    """a is a C-contiguous 1-d numba array of dtype."""
    return isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 and a.dtype == dtype


def as_i64(builder, v):
    """An integer IR value widened to i64."""
    return builder.sext(v, I64) if v.type.width < 64 else v


@intrinsic
def borrowed(typingctx, a):
    """a, as an array with no owner (meminfo NULL), for the threads of a parallel kernel to index.

    Why: each view numba makes of an array (`w13[e]`, `w13[e, r, 0]`) increments its owner's
    reference count, and decrements it when the view dies, where numba's pruning of these pairs
    gives up (views that live across branches and calls: the decode kernel's rows). The count
    is one cache line that every thread's atomics then fight over: on this repository's 2-core
    AMD, moe_gemv_q8 at one token took 4.33 ms with it against 3.98 without (8 V3 experts). Views
    of an array without owner skip the count. Only for arrays that outlive every use of the
    views: the kernel's arguments, or arrays it allocated itself and still holds."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        out = context.make_array(sig.return_type)(context, builder)
        context.populate_array(out, data=src.data, shape=src.shape, strides=src.strides,
                               itemsize=src.itemsize, meminfo=None, parent=None)  # fmt: skip
        return out._getvalue()

    return a(a), codegen


@intrinsic
def atomic_add(typingctx, a, i, v):
    """a[i] += v as one atomic step (sequentially consistent); the value before. a: int64 [n]."""
    if not (is_row(a, types.int64) and isinstance(i, types.Integer)):
        return None
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        at = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                         [as_i64(builder, args[1])])  # fmt: skip
        return builder.atomic_rmw("add", at, as_i64(builder, args[2]), "seq_cst")

    return types.int64(a, i, v), codegen


@intrinsic
def atomic_cas(typingctx, a, i, old, new):
    """If a[i] == old, a[i] = new, as one atomic step (sequentially consistent); whether it was."""
    if not (is_row(a, types.int64) and isinstance(i, types.Integer)):
        return None
    if not (isinstance(old, types.Integer) and isinstance(new, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        at = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                         [as_i64(builder, args[1])])  # fmt: skip
        pair = builder.cmpxchg(at, as_i64(builder, args[2]), as_i64(builder, args[3]), "seq_cst",
                               "seq_cst")  # fmt: skip
        return builder.extract_value(pair, 1)

    return types.boolean(a, i, old, new), codegen


@intrinsic
def atomic_load(typingctx, a, i):
    """a[i], read atomically (acquire: what its writer did before its release is visible)."""
    if not (is_row(a, types.int64) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        at = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                         [as_i64(builder, args[1])])  # fmt: skip
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
