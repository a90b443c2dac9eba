"""The activations' packing for the CPU kernels (simd_pack's intrinsics, and the quantizers built
on them: kernels_amx.quantize_tiles, kernels_amx_bf16.pack_tiles, kernels_q8.quantize_row)
against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hetero.cpu_experts import kernels_amx, kernels_amx_bf16, kernels_q8
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
