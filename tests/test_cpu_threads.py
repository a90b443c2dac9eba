"""What the CPU kernels' threads share: simd_sync's atomics, which their schedules count with,
and simd_sync.borrowed arrays (views without an owner), which they index."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hetero.cpu_experts.simd_sync import atomic_add, atomic_load, borrowed


@njit(parallel=True)
def _count(n, state):
    for _ in prange(n):
        atomic_add(state, 0, 1)
    return atomic_load(state, 0)


def test_atomic_add_counts_every_thread():
    state = np.zeros(16, np.int64)
    assert _count(10_000, state) == 10_000


@njit(parallel=True)
def _row_sums(w, rows):
    out = np.zeros(rows.shape[0], np.float32)
    for i in prange(rows.shape[0]):
        wb = borrowed(w)
        view = wb[rows[i]]  # [K] a view of the borrowed array
        total = np.float32(0.0)
        for k in range(view.shape[0]):
            total += view[k]
        out[i] = total
    return out


@njit
def _strided(w):
    return borrowed(w)[:, 1].copy()  # (a copy: a borrowed view must not outlive w)


def test_borrowed_views_read_the_owners_data():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5, 64)).astype(np.float32)
    rows = np.array([[0, 1], [7, 4], [3, 3]])
    sums = _row_sums(w.reshape(40, 64), rows[:, 0] * 5 + rows[:, 1])
    np.testing.assert_allclose(sums, w[rows[:, 0], rows[:, 1]].sum(axis=1), rtol=1e-5)
    assert np.array_equal(_strided(w), w[:, 1])  # shape and strides kept
