"""The activations' packing for the CPU kernels (simd_pack's intrinsics, and the quantizers built
on them: kernels_amx.quantize_tiles, kernels_amx_bf16.pack_tiles, kernels_q8.quantize_row)
against plain numpy; and the AMX path's vector work on the weights and sums (simd_amx's
unpack_bf16, silu_tile; kernels_amx.silu_rows)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hetero.cpu_experts import kernels_amx, kernels_amx_bf16, kernels_q8, simd_amx
from hetero.cpu_experts.simd_amx import silu_tile
from hetero.cpu_experts.simd_pack import block_amax, interleave16


@njit
def _amaxes(x):
    out = np.empty(x.shape[0] // 128, np.float32)
    for b in range(out.shape[0]):
        out[b] = block_amax(x, b * 128)
    return out


@njit
def _interleave(rows, n, out):
    for i in range(0, n, 16):
        interleave16(rows, n, i, out, 16 * i)


def test_block_amax_is_the_blocks_largest_magnitude():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(128 * 6).astype(np.float32)
    x[128:256] = 0.0  # an all-zero block
    x[300] = -50.0  # the largest magnitude negative
    x[767] = 9.0  # ... in the last lane of the last vector
    want = np.abs(x.reshape(6, 128)).max(axis=1)
    assert np.array_equal(_amaxes(x), want)


def test_interleave16_puts_the_rows_words_side_by_side():
    rng = np.random.default_rng(1)
    n = 48
    rows = rng.integers(-(2**31), 2**31, (16, n), dtype=np.int64).astype(np.int32)
    out = np.zeros(16 * n, np.int32)
    _interleave(rows.reshape(-1), n, out)
    assert np.array_equal(out.reshape(n, 16), rows.T)


def _unpacker():
    """A fresh kernel over unpack_bf16 (compiled on first call, with the path chosen then)."""

    @njit
    def unpack(w, s, ab, K, G):
        for g in range(K // G):
            simd_amx.unpack_bf16(w, g * G // 2, K // 2, s, g, K // G, ab, g * G // 32 * 16 * 32, G)

    return unpack


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("table", [True, False])
def test_unpack_bf16_equals_numpy(G, table, monkeypatch):
    """Both of unpack_bf16's paths (the table lookup where AVX-512 BW is, floats elsewhere) give
    bf16((nibble - 8) * scale), rounded to nearest even, in the A tiles' order."""
    if table and not simd_amx._has_avx512bw():
        pytest.skip("this CPU has no AVX-512 BW (the table path's vpermw)")
    monkeypatch.setattr(simd_amx, "_has_avx512bw", lambda: table)
    rng = np.random.default_rng(G)
    K = 256
    w = rng.integers(0, 256, (16, K // 2), dtype=np.uint8)
    scales = rng.standard_normal((16, K // G)).astype(np.float32) * 0.02
    scales[3, 0] = 0.0
    s = (scales.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated: any bf16)
    ab = np.zeros(16 * K, np.uint16)
    _unpacker()(w.reshape(-1), s.reshape(-1), ab, K, G)
    nib = np.empty((16, K), np.int64)  # a group's bytes: low nibbles first, then high ones
    for g in range(K // G):
        b = w[:, g * G // 2 : (g + 1) * G // 2].astype(np.int64)
        nib[:, g * G : (g + 1) * G] = np.concatenate([b & 15, b >> 4], axis=1)
    scale = (s.astype(np.uint32) << 16).view(np.float32).repeat(G, axis=1)
    exact = ((nib - 8) * scale.astype(np.float64)).astype(np.float32)  # (exact: 12 bits)
    v = exact.view(np.uint32).astype(np.uint64)
    want = ((v + 0x7FFF + ((v >> 16) & 1)) >> 16).astype(np.uint16)  # [16, K]
    got = ab.reshape(K // 32, 16, 32).transpose(1, 0, 2).reshape(16, K)
    assert np.array_equal(got, want)


@njit
def _silu_rows(acc, h, u0, nt, slab):
    kernels_amx.silu_rows(acc, h, u0, nt, slab)


@njit
def _silu_values(x, u, out):
    for t in range(x.shape[0] // 128):  # x, u [n, 8, 16] -> out [n, 16, 8] (flat)
        acc = np.empty(256, np.float32)
        for j in range(8):
            acc[32 * j : 32 * j + 16] = x[128 * t + 16 * j : 128 * t + 16 * j + 16]
            acc[32 * j + 16 : 32 * j + 32] = u[128 * t + 16 * j : 128 * t + 16 * j + 16]
        silu_tile(acc, 0, out, 128 * t, 8)


def test_silu_tile_is_as_accurate_as_f32_exp():
    """Over gate values across e^'s whole f32 range (and past it both ways): within the error of
    numpy's own f32 SiLU against float64, relative; where SiLU underflows, below 1e-30."""
    g = np.concatenate([np.linspace(-120, 100, 2**17), [0.0, -0.0, 1e-30, -1e-30, 87.3, -87.3]])
    g = np.resize(g, -(-g.shape[0] // 128) * 128).astype(np.float32)
    u = np.resize(np.float32([1.0, -3.0, 0.25, 7.0]), g.shape[0])
    out = np.empty(g.shape[0], np.float32)
    _silu_values(g, u, out)
    out = out.reshape(-1, 16, 8).transpose(0, 2, 1).ravel()  # [n, token, j] -> g's order
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    with np.errstate(over="ignore"):
        f32 = g / (np.float32(1) + np.exp(-g)) * u
    big = np.abs(exact) > 1e-30
    rel = np.abs(out[big] - exact[big]) / np.abs(exact[big])
    rel_np = np.abs(f32[big] - exact[big]) / np.abs(exact[big])
    assert rel.max() <= max(rel_np.max(), 2.5e-7)
    assert np.abs(out[~big]).max() < 1e-30
    assert np.isfinite(out).all()


def test_silu_rows_writes_each_tokens_slab_of_h():
    """silu_rows puts token m's 8 values of slab 2 at h[u0 + t, m, 16:24] and touches nothing
    else of h."""
    rng = np.random.default_rng(3)
    acc = (rng.standard_normal(3 * 256) * 4).astype(np.float32)
    h = np.full((5, 16, 64), 7.0, np.float32)
    _silu_rows(acc, h, 1, 3, 2)
    a = acc.reshape(3, 8, 2, 16).astype(np.float64)  # [t, j, gate/up, m]
    g, u = a[:, :, 0], a[:, :, 1]
    want = (g / (1 + np.exp(-g)) * u).transpose(0, 2, 1)  # [t, m, j]
    np.testing.assert_allclose(h[1:4, :, 16:24], want, rtol=3e-7, atol=1e-30)
    untouched = np.ones(h.shape, bool)
    untouched[1:4, :, 16:24] = False
    assert (h[untouched] == 7.0).all()


def _tokens(K: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = (rng.standard_normal((6, K)) * rng.uniform(0.1, 10, (6, 1))).astype(np.float32)
    src[2] = 0.0  # a token of zeros: scale 0, codes 0
    index = rng.integers(0, 6, (3, 16)).astype(np.int64)
    index[1, 9:] = -1  # padding columns
    index[0, 4] = 2
    return src, index


@pytest.mark.parametrize("G", [32, 64, 128])
def test_quantize_tiles_equals_numpy(G):
    K = 384
    src, index = _tokens(K, G)
    kt, rr = kernels_amx.tile_k(G)
    U = index.shape[0]
    xb = np.full((U, K // kt, kt // 4, 64), 7, np.int8)  # (stale contents must not show)
    xs = np.full((U, K // 128, 16), 7, np.float32)
    xsum = np.full((U, K // rr, 16), 7, np.int32)
    kernels_amx.quantize_tiles(src, index, kt, rr, xb, xs, xsum)
    x = np.where(index[..., None] >= 0, src[np.maximum(index, 0)], 0.0)  # [U, 16, K]
    scale = np.abs(x.reshape(U, 16, K // 128, 128)).max(-1) / np.float32(127)  # [U, 16, K/128]
    assert np.allclose(xs, scale.transpose(0, 2, 1), rtol=1.2e-7, atol=0)  # (fastmath: 1 ulp)
    # codes: the tiles' VNNI order back to [U, 16, K] (row kk of chunk c: k = c KT + 4 kk + j)
    q = xb.reshape(U, K // kt, kt // 4, 16, 4).transpose(0, 3, 1, 2, 4).reshape(U, 16, K)
    ref = np.rint(x / np.where(scale > 0, scale, 1).repeat(128, -1)).astype(np.int32)
    assert np.abs(q - ref).max() <= 1  # x * (1 / scale) may round a tie the other way
    assert (q == ref).mean() > 0.999
    assert np.array_equal(xsum, q.reshape(U, 16, K // rr, rr).sum(-1).transpose(0, 2, 1))


def test_pack_tiles_equals_numpy():
    K = 256
    src, index = _tokens(K, 5)
    U = index.shape[0]
    xb = np.full((U, K // 32, 16, 32), 7, np.uint16)
    kernels_amx_bf16.pack_tiles(src, index, xb)
    x = np.where(index[..., None] >= 0, src[np.maximum(index, 0)], 0.0).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # [U, 16, K]
    # chunk c, row kk: k = 32 c + 2 kk (+1) of token m at columns 2 m (+1)
    got = xb.reshape(U, K // 32, 16, 16, 2).transpose(0, 3, 1, 2, 4).reshape(U, 16, K)
    assert np.array_equal(got, bf16)


@pytest.mark.parametrize("gshift, offset", [(5, 8), (6, 8), (7, 8), (7, 128)])
def test_quantize_row_equals_numpy(gshift, offset):
    K, half = 384, (1 << gshift) // 2
    x = (np.random.default_rng(gshift).standard_normal(K) * 3).astype(np.float32)
    x[128:256] = 0.0
    xq, xs = np.zeros(K, np.int8), np.zeros(K // 128, np.float32)
    xa = np.zeros(K // 128 * 16, np.int32)
    kernels_q8.quantize_row(x, gshift, offset, xq, xs, xa)
    scale = np.abs(x.reshape(-1, 128)).max(-1) / np.float32(127)
    assert np.allclose(xs, scale, rtol=1.2e-7, atol=0)  # (fastmath: 1 ulp)
    ref = np.rint(x / np.where(scale > 0, scale, 1).repeat(128)).astype(np.int32)
    # the low nibbles' k of a block: each group's first half; then the high ones' (its second)
    k = np.arange(64)
    low = k // half * 2 * half + k % half
    order = np.concatenate([low, low + half])
    want = ref.reshape(-1, 128)[:, order]
    got = xq.reshape(-1, 128).astype(np.int32)
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    lanes = got[:, :64].reshape(-1, 16, 4).sum(-1) + got[:, 64:].reshape(-1, 16, 4).sum(-1)
    assert np.array_equal(xa, (-offset * lanes).reshape(-1))
