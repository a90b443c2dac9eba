"""A decode job's whole GEMV path in one numba call: the router's ids split into the job's parts
(a layer's experts now, then its deferred ones), and for each part: group by expert, the
experts, the per-token sum.

Why one call: the engine's worker thread needs the GIL back after every numba call, and the
caller's thread holds it while it drives the GPU; each return can wait up to Python's switch
interval. With ~4 calls and their Python glue, a job took 1.1 ms alone and 2.4 ms beside a
Python thread that kept the GIL busy (one numba thread on this 2-core machine); fused, it needs
the GIL once. A part's end is published in `done[part]` (an atomic add after its sum is
written): the caller polls it, and takes part 0 while part 1 is still being computed, with no
thread handoff or GIL in between. The inputs' arrival is a flag too (`ready`, written by the
caller, or by the CUDA stream right after the inputs' copies), polled here: the worker goes
from its queue into the kernel without waiting on a CUDA event (and for the GIL after it);
the GEMM path waits with `wait_inputs` alone.

Disk-cached like the kernels they call, which live in other files: numba keys a cache by the
defining file alone, so DEPENDS names those files' hashes (tests/test_cpu_engine.py checks
them) and a change there is a change here too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from hetero.cpu_experts.kernels import combine, group_by_expert, moe_gemv, split_parts
from hetero.cpu_experts.kernels_q8 import moe_gemv_q8
from hetero.cpu_experts.simd_sync import atomic_add, atomic_load, cycle_counter, spin_pause

JIT = {"nogil": True, "cache": True}
# what the cached wrappers here compile in from other files: file -> sha256 (16 hex digits)
DEPENDS = {
    "kernels.py": "2353efb5634e1e6f",
    "kernels_q8.py": "232a03526f9287d2",
    "simd_q8.py": "9ac2d2e1685a1995",
    "simd_sync.py": "c305241e8e8190da",
    "simd_pack.py": "b0ae36ec8e24291a",
}


@njit(**JIT)
def wait_inputs(ready, max_cycles):
    """Spins until ready[0] != 0 (the inputs' copies have landed), for at most max_cycles of
    the cycle counter: the cycles it waited, or -1 if they never came."""
    start = cycle_counter()
    while atomic_load(ready, 0) == 0:
        spin_pause()
        if cycle_counter() - start > max_cycles:
            return -1
    return cycle_counter() - start


@njit(**JIT)
def ready_parts(ready, max_cycles, ids, weights, rows_of, deferred):
    """(cycles waited for the inputs, the job's parts [n, T, k]); no parts if they never came."""
    waited = wait_inputs(ready, max_cycles)
    if waited < 0:
        return waited, np.empty((0,) + ids.shape, np.int64)
    return waited, split_parts(ids, weights, rows_of, deferred)


@njit(**JIT)
def moe_layer_q8(
    x, ids, weights, rows_of, deferred, num_experts, w13, s13, w2, s2, outs, done, rows, offset,
    ahead, threads, ready, max_cycles, stamps,
):  # fmt: skip
    """Once ready[0] != 0: outs[p] [T, H] = the routed experts of part p of ids [T, k]
    (kernels.split_parts by rows_of and deferred) on int8 activations (kernels_q8.moe_gemv_q8's
    formats and sizes), then done[p] += 1, part by part. Returns the cycles spent waiting for
    the inputs (-1: they never came). stamps int64 [3+]: [1] the cycle counter once the inputs
    are there, [2] once the sums are written, before the last part is published."""
    waited, parts = ready_parts(ready, max_cycles, ids, weights, rows_of, deferred)
    stamps[1] = cycle_counter()
    for part in range(parts.shape[0]):
        experts, ptr, pair_token, pair_slot, pos = group_by_expert(parts[part], num_experts)
        y = np.empty((pair_token.shape[0], x.shape[1]), np.float32)  # [P, H]
        moe_gemv_q8(
            x, weights, experts, ptr, pair_token, pair_slot, w13, s13, w2, s2, y, rows, offset,
            ahead, threads,
        )  # fmt: skip
        combine(pos, y, outs[part])
        if part == parts.shape[0] - 1:
            stamps[2] = cycle_counter()
        atomic_add(done, part, 1)
    return waited


@njit(**JIT)
def moe_layer(
    x, ids, weights, rows_of, deferred, num_experts, w13, s13, w2, s2, outs, done, rows, ready,
    max_cycles,
):  # fmt: skip
    """`moe_layer_q8` on fp32 activations (kernels.moe_gemv)."""
    waited, parts = ready_parts(ready, max_cycles, ids, weights, rows_of, deferred)
    for part in range(parts.shape[0]):
        experts, ptr, pair_token, pair_slot, pos = group_by_expert(parts[part], num_experts)
        moe_gemv(
            x, weights, experts, ptr, pair_token, pair_slot, pos, w13, s13, w2, s2, outs[part],
            rows,
        )  # fmt: skip
        atomic_add(done, part, 1)
    return waited
