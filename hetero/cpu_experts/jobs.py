"""The CPU expert engine's settings (`EngineConfig`), its counters (`EngineStats`) and a submitted
call (`Job`): the data the engine (engine.py) and its callers share."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class EngineConfig:
    threads: int = 0  # 0: all cores but one (that one drives the GPU)
    gemm_min_tokens: int = 4  # an expert with at least this many tokens takes the GEMM path (swept)
    # the same for layers on int8 activations (kernels_q8), whose GEMV unpacks a row once for 4
    # tokens: 2-3x faster than the GEMM path at 2-8 tokens an expert on a 2-core AMD box (int4);
    # the device sweep is pending
    gemm_min_tokens_q8: int = 32
    # where the CPU has AMX tiles (kernels_amx: int4/int8 layers), experts with at least this
    # many tokens take the AMX GEMM path instead of both of the above
    amx: bool = True
    gemm_min_tokens_amx: int = 16
    # int4 layers on the AMX path: "bf16" (dequantized a tile at a time, f32 sums in the tile
    # unit: kernels_amx_bf16), "int8" (the nibbles on int8 tiles, rescaled every group) or
    # "auto": bf16 for group 32, int8 for 64 and 128 (H100 machine, V3 layer, T=1024: g32
    # 337-381 ms on bf16 against 431 on int8; g64 449 against 284, g128 443 against 255)
    amx_int4_tiles: str = "auto"
    # the order of tile loads and products on bf16 tiles (kernels_amx_bf16.ORDERS): "2x2" has
    # each tile load feed two products (1.0 loads a product against 1.5 at an expert's ~2 token
    # tiles), "1x2db" alternates two sets of operand registers, "kb" keeps k blocks' B tiles in
    # L1 for four slabs; "1x4" until the others are measured on an AMX host
    amx_bf16_order: str = "1x4"
    rows_per_item: int = 16  # GEMV work unit: rows of one matrix a thread takes at a time
    int8_activations: bool = True  # int4/int8 GEMV on int8 activations (VNNI), see kernels_q8
    # kernels_q8's software prefetch distance (0: hardware prefetch only); on the H100 host 4 KB
    # took int4 at 1 token from 59% to 72% of read bandwidth, int8 from 72% to 88%
    prefetch_bytes: int = 4096
    # the AMX path's distance, capped at a weight row: an item reads its 16 rows side by side,
    # and past their end the prefetches run on into the thread's next item. H200 host, V3 layer,
    # T=1024, alternated in one VM (2026-12-05): a whole row (16 KB, capped) against 4 KB,
    # int4-g128 143-152 against 168 ms, int8 167-173 against 181, int4-g32 225-238 against 236-252
    amx_prefetch_bytes: int = 16384
    # copy the weights into 2 MB transparent huge pages at load: streaming 4 KB pages costs a
    # TLB walk every page (off until measured; a store's memory map is then read once, eagerly)
    hugepages: bool = False
    # Python's GIL switch interval, lowered to this for the process (0: leave it). The worker
    # needs the GIL a few times a job (a future, an event wait, the kernel's call); while the
    # caller is busy launching GPU work in Python, each can wait a whole interval: 5 ms by
    # default, and at 0.2 ms the H100 machine's traces still showed ~0.25 ms a layer with all
    # cores idle. Forced switches happen only while a thread waits, so a short one costs little.
    gil_switch_s: float = 2e-5
    # decode jobs through a ring of preallocated slots that one numba loop serves without
    # returning to Python between jobs (ring.py: 130-180 us of Python a job on the H100 host)
    ring: bool = True
    # jobs of up to this many tokens take the ring, every expert on the GEMV: decode batches
    # (one token a request) and short prompt chunks. Larger jobs take the worker's queue (GEMM
    # paths for the experts with many tokens). It was the GEMM threshold - 1 (15 with AMX), so
    # serving's decode steps of 16-64 requests went through the queue's Python on the worker
    ring_tokens: int = 64
    # a ring job with an expert of the GEMM threshold's tokens (gemm_min_tokens_amx where the
    # CPU has AMX tiles) goes back to the worker's Python for the GEMM paths; False: the ring's
    # GEMV computes every job it takes
    ring_gemm: bool = True
    # a caller's `wait` polls the part's flag this long, then naps `caller_nap_s` between polls:
    # a spinning caller holds a core, which is why `threads` leaves one free by default
    caller_spin_s: float = 5e-3
    caller_nap_s: float = 1e-4

    def num_threads(self) -> int:
        if self.threads:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 2) - 1)


@dataclass
class EngineStats:
    """Seconds the worker spent and the callers waited, for benchmarks (reset freely)."""

    busy_s: float = 0.0  # a job's run on the worker, but for the wait for its inputs
    compute_s: float = 0.0  # of which in the kernels
    wait_s: float = 0.0  # written by the calling thread only
    jobs: int = 0
    handed_back: int = 0  # ring jobs with an expert for the GEMM paths, computed off the ring
    amx_s: dict = field(default_factory=dict)  # the AMX path's seconds by step (ops.moe_gemm_amx)
    # when a list: (name, thread id, start ns, end ns) of each submit, input wait, part computed
    # and caller's wait, on time.perf_counter_ns's clock (bench/decode.py --trace)
    trace: list | None = None

    def mark(self, name: str, start_ns: int, end_ns: int | None = None, tid: int = 0) -> None:
        if self.trace is not None:
            end_ns = time.perf_counter_ns() if end_ns is None else end_ns
            self.trace.append((name, tid or threading.get_ident(), start_ns, end_ns))


@dataclass(frozen=True)
class Job:
    """A submitted call: its parts' sums `outs` [parts, T, H] fp32 on the host (pinned for CUDA
    callers), `done[p]` > 0 once part p is written, the worker's future (its errors: a pool
    future or a RingFuture), and where the results must go."""

    outs: torch.Tensor
    done: np.ndarray  # [parts] int64
    future: Future
    device: torch.device
    dtype: torch.dtype
    waited: np.ndarray  # [parts] bool
    # called with the event after the copies out of `outs` once every part has been waited for
    # (None for a CPU caller): the host buffer goes back to the engine
    recycle: Callable[[torch.cuda.Event | None], None] | None = None
    shared: bool = False  # `outs` is engine memory that later jobs reuse (a ring slot)
