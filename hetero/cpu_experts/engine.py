"""The CPU expert engine: a dedicated worker thread that runs a layer's routed experts.

Policy lives here: per expert, few tokens -> the GEMV kernel (bandwidth-bound, weights read once
per call), many tokens -> dequantize + oneDNN matmul (compute-bound). Overlap is submit / wait:
`job = cpu.submit(layer, x, ids, w)` returns at once; `y = cpu.wait(job)` blocks for the result.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from hetero.cpu_experts import amx, fused, kernels, kernels_q8, ops
from hetero.cpu_experts.formats import PackedExperts, as_tensor
from hetero.cpu_experts.host_buffers import PinnedBuffers, Specs, host_views

log = logging.getLogger(__name__)
HUGE_PAGE = 2 << 20
INPUT_TIMEOUT_S = 60.0  # a decode job whose inputs take longer than this to land is an error
SPIN_NS = 5_000_000  # a caller polls a part this long, then checks every 0.1 ms (prefill jobs)
# a caller polls in numba, without the GIL, this long at a time: the worker's Python between two
# jobs (the kernel's return, the next job's call) then never waits for the GIL. Polling from
# Python (time.sleep(0)), the caller took it back before the worker, which got it only when the
# switch interval forced a handover: ~20 us each time, 50-120 us between two layers on the H100
# machine's traces
SPIN_SLICE_S = 1e-4


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
    rows_per_item: int = 16  # GEMV work unit: rows of one matrix a thread takes at a time
    int8_activations: bool = True  # int4/int8 GEMV on int8 activations (VNNI), see kernels_q8
    # kernels_q8's software prefetch distance (0: hardware prefetch only); on the H100 host 4 KB
    # took int4 at 1 token from 59% to 72% of read bandwidth, int8 from 72% to 88%
    prefetch_bytes: int = 4096
    # copy the weights into 2 MB transparent huge pages at load: streaming 4 KB pages costs a
    # TLB walk every page (off until measured; a store's memory map is then read once, eagerly)
    hugepages: bool = False
    # Python's GIL switch interval, lowered to this for the process (0: leave it). The worker
    # needs the GIL a few times a job (a future, an event wait, the kernel's call); while the
    # caller is busy launching GPU work in Python, each can wait a whole interval: 5 ms by
    # default, and at 0.2 ms the H100 machine's traces still showed ~0.25 ms a layer with all
    # cores idle. Forced switches happen only while a thread waits, so a short one costs little.
    gil_switch_s: float = 2e-5

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
    amx_s: dict = field(default_factory=dict)  # the AMX path's seconds by step (ops.moe_gemm_amx)
    # when a list: (name, thread id, start ns, end ns) of each submit, input wait, part computed
    # and caller's wait, on time.perf_counter_ns's clock (bench/decode.py --trace)
    trace: list | None = None

    def mark(self, name: str, start_ns: int, end_ns: int | None = None) -> None:
        if self.trace is not None:
            end_ns = time.perf_counter_ns() if end_ns is None else end_ns
            self.trace.append((name, threading.get_ident(), start_ns, end_ns))


@dataclass(frozen=True)
class Job:
    """A submitted call: its parts' sums `outs` [parts, T, H] fp32 on the host (pinned for CUDA
    callers), `done[p]` > 0 once part p is written, the worker's future (its errors), and where
    the results must go."""

    outs: torch.Tensor
    done: np.ndarray  # [parts] int64
    future: Future
    device: torch.device
    dtype: torch.dtype
    specs: Specs  # its host buffer's layout, and the buffer's views (recycled for CUDA callers
    buffer: list[torch.Tensor]  # once every part has been waited for)
    waited: np.ndarray  # [parts] bool


class CPUExperts:
    """Routed experts of every MoE layer, in host RAM, computed on the CPU."""

    def __init__(
        self, layers: dict[int, PackedExperts], config: EngineConfig | None = None
    ) -> None:
        if not layers:
            raise ValueError("CPUExperts needs at least one layer")
        self.config = config or EngineConfig()
        self.threads = min(self.config.num_threads(), numba.config.NUMBA_NUM_THREADS)
        if self.config.hugepages:
            layers = {L: in_hugepages(p) for L, p in layers.items()}
        self.layers = layers
        self.stats = EngineStats()
        if self.config.gil_switch_s:
            sys.setswitchinterval(min(sys.getswitchinterval(), self.config.gil_switch_s))
        any_layer = next(iter(layers.values()))
        self._buffers = ops.DequantBuffers.for_layer(any_layer)  # used by the worker only
        self._amx_scratch: dict[str, np.ndarray] = {}  # the AMX path's buffers (worker only)
        self._staging: torch.Tensor | None = None  # see `stage`, used by the worker only
        self._staged: torch.cuda.Event | None = None  # the copies out of _staging
        self._identity: dict[int, np.ndarray] = {}  # layer -> rows [E] = arange, for submit
        self._ones: dict[torch.device, torch.Tensor] = {}  # the `arrived` flag's source
        self._pinned = PinnedBuffers()  # CUDA callers' job buffers, recycled
        self._cycles_per_s = _cycle_rate()  # kernels_q8.cycle_counter's ticks a second
        self._pool = ThreadPoolExecutor(1, "hetero-cpu-experts", initializer=self._init_worker)
        self._pool.submit(self._warm_up, any_layer).result()

    def _init_worker(self) -> None:
        numba.set_num_threads(self.threads)  # numba's setting is per calling thread
        threading.current_thread().name = "hetero-cpu-experts"

    def _warm_up(self, layer: PackedExperts) -> None:
        """Compiles (or loads from numba's disk cache) every kernel on the real array types, so
        that no request ever waits for a compiler."""
        torch.set_num_threads(self.threads)
        x = np.zeros((1, layer.hidden), np.float32)
        ids, w, out = np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32), x[None].copy()
        rows, arrived = np.arange(layer.num_experts), np.ones(1, np.int64)
        for threshold in (2**62, 1):
            done = np.zeros(1, np.int64)
            self._compute(layer, x, ids, w, rows, 0, out, done, arrived, threshold)
        fused.wait_inputs(done, 1)  # `wait`'s poll, called from Python

    def submit(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        rows: np.ndarray | None = None,
        deferred: int = 0,
    ) -> Job:
        """x [T, H], ids [T, k] (-1: none), weights [T, k] -> a Job for `wait`.

        `rows` [E] int64: the engine row of each expert id, -1 for experts computed elsewhere
        (default: expert e is row e). `deferred` d > 0: the job has two parts, part 1 each
        token's d lowest-weight CPU slots, part 0 the rest; both are computed in one kernel
        call, part 0 first, each ready for `wait(job, part)` as soon as it is written.
        CUDA inputs are copied into pinned host memory without blocking the caller's stream."""
        start = time.perf_counter_ns()
        if layer not in self.layers:
            raise KeyError(f"layer {layer} has no CPU experts (have {sorted(self.layers)})")
        if rows is None:
            rows = self._identity.setdefault(layer, np.arange(self.layers[layer].num_experts))
        else:
            ops.check_rows(rows, self.layers[layer].num_experts)
        parts = 2 if deferred > 0 else 1
        # inputs and outputs in one host buffer (pinned for CUDA callers: one allocation a job,
        # not four); the copies also free the caller to reuse its tensors at once
        specs = ((tuple(x.shape), torch.float32), (tuple(ids.shape), torch.int64),
                 (tuple(weights.shape), torch.float32), ((parts, *x.shape), torch.float32),
                 ((1,), torch.int64))  # fmt: skip
        buffer = self._pinned.take(specs) if x.is_cuda else host_views(specs, pin=False)
        *host, outs, arrived = buffer
        # the buffer is uninitialized (pinned blocks are recycled): a 1 left in `arrived` by an
        # earlier job would start the kernel on inputs not copied yet
        arrived.zero_()
        self.stats.mark("alloc", start)
        # queued before its inputs are copied: the worker waits on `arrived` inside the kernel,
        # so it starts as soon as the copies land, not once this Python returns
        done = np.zeros(parts, np.int64)
        args = (layer, host, arrived.numpy(), rows, deferred, outs.numpy(), done)
        future = self._pool.submit(self._run, *args)
        copies = time.perf_counter_ns()
        for h, t in zip(host, (x, ids, weights)):
            h.copy_(t, non_blocking=x.is_cuda)  # (copy_ converts the dtype)
        if x.is_cuda:  # the stream sets `arrived` once the inputs' copies are done
            arrived.copy_(self._one(x.device), non_blocking=True)
        else:
            arrived.fill_(1)
        self.stats.mark("copies", copies)
        self.stats.mark("submit", start)
        return Job(outs, done, future, x.device, x.dtype, specs, buffer, np.zeros(parts, bool))

    def wait(self, job: Job, part: int = 0) -> torch.Tensor:
        """Part `part` of the job's sum, on the caller's device. Polls the part's flag (without
        the GIL, SPIN_SLICE_S at a time): part 0 of a decode job is taken as soon as the kernel
        has written it, while the worker goes on with the deferred part."""
        start = time.perf_counter_ns()
        spin_until = start + SPIN_NS
        flag, cycles = job.done[part : part + 1], int(SPIN_SLICE_S * self._cycles_per_s)
        while fused.wait_inputs(flag, cycles) < 0:
            if job.future.done():
                job.future.result()  # the worker's error, if it had one
                if not job.done[part]:
                    raise RuntimeError(f"the job ended without computing part {part}")
            if time.perf_counter_ns() > spin_until:
                time.sleep(1e-4)  # long jobs: nap
        self.stats.wait_s += (time.perf_counter_ns() - start) / 1e9
        self.stats.mark("wait", start)
        out = job.outs[part].to(job.device, non_blocking=True).to(job.dtype)
        job.waited[part] = True
        if job.device.type == "cuda" and job.waited.all():  # (a CPU caller's out is the buffer)
            event = torch.cuda.Event()
            event.record()  # after the copy out of it
            self._pinned.give(job.specs, job.buffer, event)
        return out

    def forward(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer, x, ids, weights))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def stage(self, layer: int, device: torch.device) -> list[torch.Tensor]:
        """Layer `layer`'s packed arrays on `device` (torch tensors of the arrays' dtypes and
        shapes): the engine's threads copy them into one reusable host buffer (pinned when CUDA
        is present, so they cross PCIe at full speed), then asynchronous copies on the current
        stream take them to `device`. The buffer is overwritten by the next call only after
        those copies are done (an event guards it)."""
        host = self._pool.submit(self._stage, self.layers[layer]).result()
        out = [h.to(device, non_blocking=True) for h in host]
        if torch.device(device).type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()
        return out

    def _stage(self, packed: PackedExperts) -> list[torch.Tensor]:
        if self._staged is not None:
            self._staged.synchronize()  # the previous layer's copies have left the buffer
        arrays = list(packed.arrays().values())
        total = sum(a.nbytes for a in arrays)
        if self._staging is None or self._staging.numel() < total:
            pin = torch.cuda.is_available()
            self._staging = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        out, offset = [], 0
        for a in arrays:
            out.append(as_tensor(_copy_into(a, self._staging[offset:].numpy())))
            offset += a.nbytes
        return out

    def _one(self, device: torch.device) -> torch.Tensor:
        if device not in self._ones:
            self._ones[device] = torch.ones(1, dtype=torch.int64, device=device)
        return self._ones[device]

    def _run(self, layer: int, host, arrived, rows, deferred: int, outs, done) -> None:
        start, waited = time.perf_counter_ns(), 0  # waited: ns idle before the inputs landed
        try:
            x, ids, weights = (t.numpy() for t in host)
            t0 = time.perf_counter_ns()
            args = (x, ids, weights, rows, deferred, outs, done, arrived)
            waited = int(self._compute(self.layers[layer], *args) * 1e9)
            self.stats.compute_s += (time.perf_counter_ns() - t0 - waited) / 1e9
            if waited:
                self.stats.mark("input", t0, t0 + waited)
            self.stats.mark(f"L{layer}", t0 + waited)
        finally:
            self.stats.busy_s += (time.perf_counter_ns() - start - waited) / 1e9
            self.stats.jobs += 1

    def _compute(
        self,
        layer: PackedExperts,
        x: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        rows: np.ndarray,
        deferred: int,
        outs: np.ndarray,
        done: np.ndarray,
        arrived: np.ndarray,
        gemm_min_tokens: int | None = None,
    ) -> float:
        """The policy: GEMV for experts with few tokens, GEMM for the rest. The job's parts
        (kernels.split_parts) go to outs [n, T, H] fp32, flagged in done [n] (ops.moe_layer).
        Both first wait (spinning) for the inputs' flag `arrived` int64 [1]; returns the seconds
        that took."""
        c = self.config
        timeout = int(INPUT_TIMEOUT_S * self._cycles_per_s)
        q8 = c.int8_activations and ops.q8_activations(layer)
        threshold = c.gemm_min_tokens_q8 if q8 else c.gemm_min_tokens
        if self._tiles(layer):
            threshold = c.gemm_min_tokens_amx
        threshold = threshold if gemm_min_tokens is None else gemm_min_tokens
        x = np.ascontiguousarray(x, np.float32)
        weights = np.ascontiguousarray(weights, np.float32)
        if x.shape[0] < threshold:  # no expert can reach the GEMM path: one numba call (decode)
            cycles = ops.moe_layer(
                layer, x, ids, weights, rows, deferred, outs, done, c.rows_per_item,
                c.int8_activations, c.prefetch_bytes, arrived, timeout,
            )  # fmt: skip
            return cycles / self._cycles_per_s
        cycles = ops.wait_inputs(arrived, timeout)
        parts = kernels.split_parts(np.ascontiguousarray(ids, np.int64), weights, rows, deferred)
        for part in range(len(parts)):
            self._compute_mixed(layer, x, parts[part], weights, outs[part], threshold)
            done[part] += 1
        return cycles / self._cycles_per_s

    def _compute_mixed(self, layer, x, ids, weights, out, threshold: int) -> None:
        """One part with the GEMM path for experts of `threshold` tokens or more."""
        c = self.config
        g = ops.group_by_expert(ids, layer.num_experts)
        heavy = np.flatnonzero(g.counts() >= threshold)  # experts for the GEMM path
        light = g
        if heavy.size:
            on_gemm = np.isin(ids, g.experts[heavy])  # [T, k]
            light = ops.group_by_expert(np.where(on_gemm, -1, ids), layer.num_experts)
        ops.moe_gemv(
            layer, x, weights, light, out, c.rows_per_item, c.int8_activations, c.prefetch_bytes
        )
        if heavy.size and self._tiles(layer):
            heavy_g = ops.group_by_expert(np.where(on_gemm, ids, -1), layer.num_experts)
            ops.moe_gemm_amx(
                layer, x, weights, heavy_g, out, self._amx_scratch, c.prefetch_bytes,
                self.stats.amx_s, c.amx_int4_tiles,
            )  # fmt: skip
            return
        y, xt = torch.from_numpy(out), torch.from_numpy(x)
        for a in heavy:
            pairs = slice(g.ptr[a], g.ptr[a + 1])
            tokens = torch.from_numpy(g.pair_token[pairs])
            w = torch.from_numpy(weights[g.pair_token[pairs], g.pair_slot[pairs]])[:, None]
            ye = ops.expert_gemm(layer, int(g.experts[a]), xt[tokens], self._buffers)
            y.index_add_(0, tokens, ye * w)

    def uses_amx(self, layer: int) -> bool:
        """Whether layer `layer`'s experts with many tokens go to AMX tiles (kernels_amx)."""
        return self._tiles(self.layers[layer])

    def _tiles(self, layer: PackedExperts) -> bool:
        return self.config.amx and ops.amx_ok(layer) and amx.enable()


def in_hugepages(packed: PackedExperts) -> PackedExperts:
    """The layer's arrays copied into anonymous memory advised for transparent huge pages
    (MADV_HUGEPAGE: taken where the kernel allows THP on request)."""

    def copy(a: np.ndarray) -> np.ndarray:
        size = -(-max(a.nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
        buf = mmap.mmap(-1, size + HUGE_PAGE)  # page-aligned only: room to start on a 2 MB one
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(buf, dtype=np.uint8)  # keeps buf alive
        return _copy_into(a, whole[-whole.ctypes.data % HUGE_PAGE :])

    arrays = {k: copy(a) for k, a in packed.arrays().items()}
    return PackedExperts(packed.fmt, **arrays)


def _copy_into(a: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """a copied, by all the engine's threads, to the start of the bytes dst; that copy as an
    array shaped and typed like a."""
    out = dst[: a.nbytes]
    kernels.copy_bytes(np.ascontiguousarray(a).reshape(-1).view(np.uint8), out)
    return out.view(a.dtype).reshape(a.shape)


def _cycle_rate() -> float:
    """Ticks a second of the CPU's cycle counter (constant-rate TSC), measured over 20 ms."""
    kernels_q8.read_cycles()  # compiled (or loaded) first
    t0, c0 = time.perf_counter(), kernels_q8.read_cycles()
    time.sleep(0.02)
    return (kernels_q8.read_cycles() - c0) / (time.perf_counter() - t0)
