"""The LLVM IR of kernels_amx's vector work around the tiles: unpacking int4 rows into A tiles'
bytes, prefetching the 16 rows an item reads side by side, and rescaling a C tile's int32 sums
into the f32 accumulators. numba's disk cache is keyed by the defining file only: kernels_amx's
DEPENDS names this file's hash (a test checks it)."""

from __future__ import annotations

from llvmlite import ir
from llvmlite.ir.types import _BaseFloatType
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TM = 16  # tokens a B tile, rows an A tile (and of a C tile)

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()


class BFloat(_BaseFloatType):
    """LLVM's bfloat, which llvmlite lacks: `fptrunc` to it is `vcvtneps2bf16` (round to
    nearest even) on AVX-512 BF16 CPUs, an integer sequence elsewhere."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self) -> str:
        return "bfloat"


BFloat._create_instance()


def _host_has(feature: str) -> bool:
    """Whether this host's CPU has `feature` (LLVM's name, e.g. "avx512bw"). The kernels choose
    their code by it at compile time; the features are part of numba's cache key."""
    from llvmlite import binding as llvm

    return f"+{feature}" in llvm.get_host_cpu_features().flatten().split(",")


def _has_bf16_convert() -> bool:
    """Whether this host converts f32 to bf16 in one instruction (AVX-512 BF16). Elsewhere LLVM
    lowers `fptrunc` to bfloat as a call to compiler-rt's __truncsfbf2, which numba's JIT does
    not link ("LLVM ERROR: Symbol not found": the process aborts)."""
    return _host_has("avx512bf16")


def _bf16_bits(builder, y, n: int):
    """<n x i16> bf16 bits of the <n x float> y, rounded to nearest even (finite y)."""
    if _has_bf16_convert():
        b = builder.fptrunc(y, ir.VectorType(BFloat(), n))
        return builder.bitcast(b, ir.VectorType(I16, n))
    vi = ir.VectorType(I32, n)
    bits = builder.bitcast(y, vi)
    odd = builder.and_(builder.lshr(bits, ir.Constant(vi, [16] * n)), ir.Constant(vi, [1] * n))
    rounded = builder.add(builder.add(bits, ir.Constant(vi, [0x7FFF] * n)), odd)
    return builder.trunc(builder.lshr(rounded, ir.Constant(vi, [16] * n)), ir.VectorType(I16, n))


def _row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout in "CA" and a.dtype == dtype


def _vec(builder, ptr, offset, n, ty):
    """A <n x ty> pointer `offset` elements past ptr."""
    return builder.bitcast(builder.gep(ptr, [offset]), ir.VectorType(ty, n).as_pointer())


def _mask(indices: list[int]):
    """A shufflevector mask: the lanes `indices` of the (concatenated) operands."""
    return ir.Constant(ir.VectorType(I32, len(indices)), indices)


def _splat(builder, f, n=16):
    """<n x float> of the float f."""
    one = builder.insert_element(ir.Constant(ir.VectorType(F32, n), ir.Undefined), f, I32(0))
    return builder.shuffle_vector(one, one, _mask([0] * n))


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
def load_scales(typingctx, s, start, step, out):
    """out[r] = s[start + r * step] as f32 for r < 16: the scales of 16 weight rows for one
    group (s flat: bf16 bits or f32; rows `step` scales apart). Plain loads, without numba's
    index arithmetic (its wrap of negative indices: three instructions a load)."""
    if not ((_row(s, types.uint16) or _row(s, types.float32)) and _row(out, types.float32)):
        return None
    if not (isinstance(start, types.Integer) and isinstance(step, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s_p, out_p = (
            context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3)
        )
        start_, step_ = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2))
        bf16 = sig.args[0].dtype == types.uint16
        for r in range(TM):
            v = builder.load(builder.gep(s_p, [builder.add(start_, builder.mul(step_, I64(r)))]))
            if bf16:
                v = builder.bitcast(builder.shl(builder.zext(v, I32), I32(16)), F32)
            builder.store(v, builder.gep(out_p, [I64(r)]))
        return context.get_dummy_value()

    return types.none(s, start, step, out), codegen


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


def _has_avx512bw() -> bool:
    """Whether this host permutes 16-bit words across a 512-bit register (`vpermw`)."""
    return _host_has("avx512bw")


def _nibble_words(builder, v) -> list:
    """The <32 x i16> table indices of each 32-k chunk of an int4 group whose G/2 bytes are v
    (low nibbles first: byte i holds k = i and k = i + G/2). A word's low 4 bits are its nibble;
    bit 4 may hold the other nibble's, which is why the table holds its 16 values twice
    (`vpermw` reads 5 bits). G = 32: the 16 bytes twice over, the second copy shifted right 4;
    larger G: 32 bytes at a time, as they are (k of the first half), then shifted (the second)."""
    half = v.type.count
    words = ir.VectorType(I16, 32)
    if half == 16:
        both = builder.shuffle_vector(v, v, _mask([*range(16)] * 2))
        shift = ir.Constant(words, [0] * 16 + [4] * 16)
        return [builder.lshr(builder.zext(both, words), shift)]
    low = [
        builder.zext(builder.shuffle_vector(v, v, _mask([*range(p, p + 32)])), words)
        for p in range(0, half, 32)
    ]
    return low + [builder.lshr(w, ir.Constant(words, [4] * 32)) for w in low]


@intrinsic
def unpack_bf16(typingctx, w, start, rowb, s, s_at, s_step, ab, ab_at, g):
    """The 16 int4 rows' groups from byte `start` of w (rows `rowb` bytes apart), one group of g
    k a row (32, 64 or 128), dequantized to bf16 bits in ab (uint16): chunk c (32 k) of row r
    at element ab_at + (16 c + r) * 32, so each 32-k chunk of the 16 rows is one 1 KB A tile.
    Row r's scale is s[s_at + r * s_step] (bf16 bits); a weight is (nibble - 8) * scale.

    With AVX-512 BW, a row's group is a table lookup: its 16 possible values (j - 8) * scale,
    rounded to bf16 once, and `vpermw` picks 32 of them a register by the nibbles (on this
    repository's 2-core AMD: 1.7x the float path's speed at g = 32, 2.1-2.3x at 64 and 128;
    bench/cpu_vector_micro.py).
    Elsewhere the nibbles are converted to floats and scaled. (j - 8) * scale has at most 12
    significant bits, exact in f32 either way: the two give the same bits."""
    if not (_row(w, types.uint8) and _row(s, types.uint16) and _row(ab, types.uint16)):
        return None
    if not all(isinstance(t, types.Integer) for t in (start, rowb, s_at, s_step, ab_at, g)):
        return None

    def codegen(context, builder, sig, args):
        w_p, s_p, ab_p = (
            context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3, 6)
        )
        w_p = builder.bitcast(w_p, I8.as_pointer())
        start_, rowb_, s_at_, s_step_, ab_at_, g_ = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 4, 5, 7, 8)
        )
        fast, words = ("fast",), ir.VectorType(I16, 32)
        lut = _has_avx512bw()
        if lut:
            fnty = ir.FunctionType(words, [words, words])
            name = "llvm.x86.avx512.permvar.hi.512"  # vpermw
            permute = cgutils.get_or_insert_function(builder.module, fnty, name)
        codes = ir.Constant(ir.VectorType(F32, 16), [float(j - 8) for j in range(16)])
        end = builder.append_basic_block("unpacked")
        switch = builder.switch(g_, end)
        for group in (32, 64, 128):
            block = builder.append_basic_block(f"g{group}")
            switch.add_case(I64(group), block)
            builder.position_at_end(block)
            half = group // 2
            bytes_, vf = ir.VectorType(I8, half), ir.VectorType(F32, group)
            low, four = ir.Constant(bytes_, [15] * half), ir.Constant(bytes_, [4] * half)
            both = _mask([*range(group)])
            for r in range(TM):
                src = builder.add(start_, builder.mul(rowb_, I64(r)))
                v = builder.load(_vec(builder, w_p, src, half, I8), align=1)
                at_s = builder.add(s_at_, builder.mul(s_step_, I64(r)))
                bits = builder.load(builder.gep(s_p, [at_s]))
                scale = builder.bitcast(builder.shl(builder.zext(bits, I32), I32(16)), F32)
                if lut:  # the row's 16 values, twice over in a 32-word table
                    t = _bf16_bits(
                        builder, builder.fmul(codes, _splat(builder, scale), flags=fast), 16
                    )
                    t = builder.shuffle_vector(t, t, _mask([*range(16)] * 2))
                    chunks = [builder.call(permute, [t, i]) for i in _nibble_words(builder, v)]
                else:
                    q = builder.shuffle_vector(builder.and_(v, low), builder.lshr(v, four), both)
                    sv = _splat(builder, scale, group)
                    y = builder.fsub(
                        builder.fmul(builder.uitofp(q, vf), sv, flags=fast),
                        builder.fmul(sv, ir.Constant(vf, [8.0] * group), flags=fast),
                        flags=fast,
                    )
                    b = _bf16_bits(builder, y, group)
                    chunks = [
                        builder.shuffle_vector(b, b, _mask([*range(32 * c, 32 * c + 32)]))
                        for c in range(group // 32)
                    ]
                for c, chunk in enumerate(chunks):
                    at = builder.add(ab_at_, I64((16 * c + r) * 32))
                    builder.store(chunk, _vec(builder, ab_p, at, 32, I16), align=2)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return types.none(w, start, rowb, s, s_at, s_step, ab, ab_at, g), codegen


def _exp(builder, x):
    """<16 x float> e^x, as Cephes' expf: n = round(x log2 e); r = x - n ln 2 (ln 2 in two
    parts, so r is exact); e^r a degree-7 polynomial; times 2^n built in the exponent bits.
    x is clamped to [-87.3, 88.3] (2^n stays a normal float). Within 2 ulp of e^x there."""
    v16, vi = ir.VectorType(F32, 16), ir.VectorType(I32, 16)

    def c(f):
        return ir.Constant(v16, [f] * 16)

    def call(name, *a):
        fnty = ir.FunctionType(v16, [v16] * len(a))
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(a))

    exact = ("contract",)  # (no reassociation: the two-part reduction must stay as written)
    x = call("llvm.maxnum.v16f32", call("llvm.minnum.v16f32", x, c(88.3)), c(-87.3))
    n = call("llvm.rint.v16f32", builder.fmul(x, c(1.44269504088896341), flags=exact))
    r = builder.fsub(x, builder.fmul(n, c(0.693359375), flags=exact), flags=exact)
    r = builder.fsub(r, builder.fmul(n, c(-2.12194440e-4), flags=exact), flags=exact)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = builder.fadd(builder.fmul(p, r, flags=exact), c(k), flags=exact)
    y = builder.fadd(builder.fmul(p, builder.fmul(r, r, flags=exact), flags=exact), r, flags=exact)
    y = builder.fadd(y, c(1.0), flags=exact)
    bits = builder.shl(builder.add(builder.fptosi(n, vi), ir.Constant(vi, [127] * 16)),
                       ir.Constant(vi, [23] * 16))  # fmt: skip
    return builder.fmul(y, builder.bitcast(bits, v16), flags=exact)


@intrinsic
def silu_tile(typingctx, acc, at, h, base, stride):
    """h[base + m * stride + j] = silu(g) * u for the sums acc [16 rows x 16 tokens] from element
    `at` (rows alternating gate g, up u: row 2 j, 2 j + 1), token m < 16, j < 8; h flat f32 (C
    order, any number of dimensions). silu(g) = g / (1 + e^-g), e^ as `_exp`."""
    flat = isinstance(h, types.Array) and h.layout == "C" and h.dtype == types.float32
    if not (_row(acc, types.float32) and flat):
        return None
    if not all(isinstance(t, types.Integer) for t in (at, base, stride)):
        return None

    def codegen(context, builder, sig, args):
        acc_p, h_p = (
            context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 2)
        )
        at_, base_, stride_ = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3, 4)
        )
        fast, v16, v8 = ("fast",), ir.VectorType(F32, 16), ir.VectorType(F32, 8)
        one = ir.Constant(v16, [1.0] * 16)
        ys = []
        for j in range(TM // 2):
            g, u = (
                builder.load(
                    _vec(builder, acc_p, builder.add(at_, I64(16 * (2 * j + i))), 16, F32), align=4
                )  # fmt: skip
                for i in (0, 1)
            )
            e = _exp(builder, builder.fneg(g))
            ys.append(builder.fmul(builder.fdiv(g, builder.fadd(one, e, flags=fast), flags=fast),
                                   u, flags=fast))  # fmt: skip
        for m in range(TM):
            row = ir.Constant(v8, ir.Undefined)
            for j, y in enumerate(ys):
                row = builder.insert_element(row, builder.extract_element(y, I32(m)), I32(j))
            at = builder.add(base_, builder.mul(stride_, I64(m)))
            builder.store(row, _vec(builder, h_p, at, 8, F32), align=4)
        return context.get_dummy_value()

    return types.none(acc, at, h, base, stride), codegen
