"""Intel AMX tiles as numba intrinsics, with an exact emulation where the CPU has none.

AMX (Sapphire Rapids and later Xeons) adds eight tile registers of up to 16 rows x 64 bytes and
a tile unit that multiplies them: `tdpbusd` C[16 x 16] i32 += A[16 x 64] u8 . B[64 x 16] s8 in
16 cycles, 1024 multiply-adds a cycle and core, 8x what AVX-512 VNNI reaches. B is stored in
"VNNI" order: row kk of a B tile holds, for each of its 16 columns n, the 4 values k = 4 kk..4 kk
+ 3 (so a B tile is KT/4 rows of 64 bytes for KT values of k). `tdpbf16ps` does the same on
bf16 pairs into f32: C[16 x 16] f32 += A[16 x 32] . B[32 x 16], B rows holding 2 k a column.

Each intrinsic takes `tiles`, a uint8 scratch array of TILES_BYTES per thread, and literal tile
numbers (LLVM encodes them in the instruction). On a CPU with AMX they compile to the tile
instructions and ignore `tiles`; elsewhere to numba code that keeps the eight tiles and the
configuration in `tiles` and computes the same integers, or for bf16 the same sums up to the
order of f32 rounding (the tests run the kernels that way, on any CPU). The choice is made at
compile time from the host's features, which are part of numba's cache key, so a cache never
crosses the two.

Linux hands AMX's 8 KB of tile state to a process only on request: `enable()` asks once per
process (arch_prctl), before the first kernel that uses tiles.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from hetero.cpu_experts.kernels import bf16_to_f32

ROWS, COLSB = 16, 64  # the largest tile: 16 rows of 64 bytes
TILE = ROWS * COLSB
CFG = 64  # bytes of a tile configuration (ldtilecfg's operand)
TILES_BYTES = CFG + 8 * TILE  # emulation: the configuration, then the eight tiles

I8, I64 = ir.IntType(8), ir.IntType(64)
VOID = ir.VoidType()


@functools.cache
def has_amx() -> bool:
    """The host CPU has AMX tiles with int8 and bf16 products (as LLVM sees it)."""
    features = set(llvm.get_host_cpu_features().flatten().split(","))
    return {"+amx-tile", "+amx-int8", "+amx-bf16"} <= features


@functools.cache
def enable() -> bool:
    """Asks Linux for the tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); True if tiles
    can be used in this process (a CPU without AMX: False)."""
    if not has_amx():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    return libc.syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0


def config(shapes: dict[int, tuple[int, int]]) -> np.ndarray:
    """A tile configuration (palette 1): {tile: (rows, bytes a row)} -> uint8 [64]."""
    cfg = np.zeros(CFG, np.uint8)
    cfg[0] = 1
    for t, (rows, colsb) in shapes.items():
        if not (0 <= t < 8 and 0 < rows <= ROWS and 0 < colsb <= COLSB and colsb % 4 == 0):
            raise ValueError(f"tile {t}: {rows} rows x {colsb} bytes is not a valid tile")
        cfg[16 + 2 * t : 18 + 2 * t] = np.frombuffer(np.uint16(colsb).tobytes(), np.uint8)
        cfg[48 + t] = rows
    return cfg


# --- emulation: the tiles live in `tiles` --------------------------------------------------


@njit(inline="always")
def _shape(tiles, t):
    return np.int64(tiles[48 + t]), np.int64(tiles[16 + 2 * t]) | np.int64(tiles[17 + 2 * t]) << 8


def _emu_config(tiles, cfg):
    tiles[:CFG] = cfg[:CFG]


def _emu_zero(tiles, t):
    tiles[CFG + t * TILE : CFG + (t + 1) * TILE] = 0


def _emu_load(tiles, t, src, offset, stride):
    rows, colsb = _shape(tiles, t)
    b = src.view(np.uint8)
    for r in range(rows):
        at = CFG + t * TILE + r * COLSB
        tiles[at : at + colsb] = b[offset + r * stride : offset + r * stride + colsb]


def _emu_store(tiles, t, dst, offset, stride):
    rows, colsb = _shape(tiles, t)
    b = dst.view(np.uint8)
    for r in range(rows):
        at = CFG + t * TILE + r * COLSB
        b[offset + r * stride : offset + r * stride + colsb] = tiles[at : at + colsb]


@njit(inline="always")
def _emu_dp(tiles, c, a, b, a_signed, b_signed):
    """C[m, n] += sum over k of A[m, k] B[k, n] (bytes, B in VNNI order), as tdpb{s,u}{s,u}d."""
    rows, colsb = _shape(tiles, c)
    k4 = _shape(tiles, a)[1] // 4
    ct = tiles[CFG + c * TILE : CFG + (c + 1) * TILE].view(np.int32)
    at = tiles[CFG + a * TILE : CFG + (a + 1) * TILE]
    bt = tiles[CFG + b * TILE : CFG + (b + 1) * TILE]
    for m in range(rows):
        for n in range(colsb // 4):
            total = np.int32(0)
            for kk in range(k4):
                for j in range(4):
                    x = np.int32(at[m * COLSB + 4 * kk + j])
                    y = np.int32(bt[kk * COLSB + 4 * n + j])
                    x = x - 256 if a_signed and x > 127 else x
                    y = y - 256 if b_signed and y > 127 else y
                    total += x * y
            ct[m * 16 + n] += total


def _emu_bf16ps(tiles, c, a, b):
    """C[m, n] += sum over k of A[m, k] B[k, n] (bf16, B in pairs: row kk of B holds k = 2 kk,
    2 kk + 1 of each column), into f32, as tdpbf16ps."""
    rows, colsb = _shape(tiles, c)
    k2 = _shape(tiles, a)[1] // 4
    ct = tiles[CFG + c * TILE : CFG + (c + 1) * TILE].view(np.float32)
    at = tiles[CFG + a * TILE : CFG + (a + 1) * TILE].view(np.uint16)
    bt = tiles[CFG + b * TILE : CFG + (b + 1) * TILE].view(np.uint16)
    half = COLSB // 2  # bf16 a tile row
    for m in range(rows):
        for n in range(colsb // 4):
            total = ct[m * 16 + n]
            for kk in range(k2):
                for j in range(2):
                    x = bf16_to_f32(at[m * half + 2 * kk + j])
                    total += x * bf16_to_f32(bt[kk * half + 2 * n + j])
            ct[m * 16 + n] = total


def _emu_busd(tiles, c, a, b):
    _emu_dp(tiles, c, a, b, False, True)


def _emu_bssd(tiles, c, a, b):
    _emu_dp(tiles, c, a, b, True, True)


# --- the intrinsics ---------------------------------------------------------------------


def _tile_number(t) -> int | None:
    if isinstance(t, types.IntegerLiteral) and 0 <= t.literal_value < 8:
        return t.literal_value
    return None


def _is_scratch(tiles) -> bool:
    return isinstance(tiles, types.Array) and tiles.dtype == types.uint8 and tiles.ndim == 1


def _is_bytes(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"


def _call(builder, name, args):
    fnty = ir.FunctionType(VOID, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _emulate(context, builder, impl, sig, args):
    """impl(*args) compiled as numba code, tile numbers as plain int64."""
    argtys = [types.int64 if isinstance(t, types.IntegerLiteral) else t for t in sig.args]
    vals = [
        ir.Constant(I64, t.literal_value) if isinstance(t, types.IntegerLiteral) else v
        for t, v in zip(sig.args, args)
    ]
    context.compile_internal(builder, impl, types.none(*argtys), vals)
    return context.get_dummy_value()


def _pointer(context, builder, arrty, arr, offset):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, I8.as_pointer()), [offset])


@intrinsic(prefer_literal=True)
def tile_config(typingctx, tiles, cfg):
    """Loads the tile configuration cfg (uint8 [64], `config`) for this thread."""
    if not (_is_scratch(tiles) and _is_scratch(cfg)):
        return None

    def codegen(context, builder, sig, args):
        if not has_amx():
            return _emulate(context, builder, _emu_config, sig, args)
        _call(builder, "llvm.x86.ldtilecfg", [_pointer(context, builder, cfg, args[1], I64(0))])
        return context.get_dummy_value()

    return types.none(tiles, cfg), codegen


@intrinsic
def tile_release(typingctx, tiles):
    """Gives the tile state back (call when a thread is done with tiles)."""
    if not _is_scratch(tiles):
        return None

    def codegen(context, builder, sig, args):
        if has_amx():
            _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()

    return types.none(tiles), codegen


@intrinsic(prefer_literal=True)
def tile_zero(typingctx, tiles, t):
    if not (_is_scratch(tiles) and _tile_number(t) is not None):
        return None

    def codegen(context, builder, sig, args):
        if not has_amx():
            return _emulate(context, builder, _emu_zero, sig, args)
        _call(builder, "llvm.x86.tilezero", [I8(_tile_number(t))])
        return context.get_dummy_value()

    return types.none(tiles, t), codegen


def _memory_op(name, emu):
    """tile_load / tile_store: tile t <-> the rows of `a` (1-D, C order) starting `offset` bytes
    in, `stride` bytes apart."""

    def typer(typingctx, tiles, t, a, offset, stride):
        if not (_is_scratch(tiles) and _tile_number(t) is not None and _is_bytes(a)):
            return None
        if not (isinstance(offset, types.Integer) and isinstance(stride, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            if not has_amx():
                return _emulate(context, builder, emu, sig, args)
            off = context.cast(builder, args[3], sig.args[3], types.int64)
            step = context.cast(builder, args[4], sig.args[4], types.int64)
            ptr = _pointer(context, builder, sig.args[2], args[2], off)
            _call(builder, name, [I8(_tile_number(t)), ptr, step])
            return context.get_dummy_value()

        return types.none(tiles, t, a, offset, stride), codegen

    return intrinsic(prefer_literal=True)(typer)


tile_load = _memory_op("llvm.x86.tileloadd64", _emu_load)
tile_store = _memory_op("llvm.x86.tilestored64", _emu_store)


def _dot_op(name, emu):
    """tile_dp_*(tiles, c, a, b): C += A . B (a: rows of A, b: B in VNNI order); on bytes into
    int32: busd A unsigned and B signed, bssd both signed; bf16ps: on bf16 pairs into f32."""

    def typer(typingctx, tiles, c, a, b):
        if not (_is_scratch(tiles) and all(_tile_number(x) is not None for x in (c, a, b))):
            return None

        def codegen(context, builder, sig, args):
            if not has_amx():
                return _emulate(context, builder, emu, sig, args)
            _call(builder, name, [I8(_tile_number(x)) for x in (c, a, b)])
            return context.get_dummy_value()

        return types.none(tiles, c, a, b), codegen

    return intrinsic(prefer_literal=True)(typer)


tile_dp_busd = _dot_op("llvm.x86.tdpbusd", _emu_busd)
tile_dp_bssd = _dot_op("llvm.x86.tdpbssd", _emu_bssd)
tile_dp_bf16ps = _dot_op("llvm.x86.tdpbf16ps", _emu_bf16ps)
