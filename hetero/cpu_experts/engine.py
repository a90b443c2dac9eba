"""The CPU expert engine: a dedicated worker thread that runs a layer's routed experts.

Policy lives here: per expert, few tokens -> the GEMV kernel (bandwidth-bound, weights read once
per call), many tokens -> dequantize + oneDNN matmul (compute-bound). Overlap is submit / wait:
`job = cpu.submit(layer, x, ids, w)` returns at once; `y = cpu.wait(job)` blocks for the result.
Decode-sized jobs go through a ring of preallocated slots that one numba loop serves with no
Python between jobs (ring.py); the rest through the worker's queue, one Python call each.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numba
import numpy as np
import torch

from hetero.cpu_experts import amx, fused, kernels, kernels_q8, ops
from hetero.cpu_experts.formats import PackedExperts
from hetero.cpu_experts.host_buffers import PinnedBuffers, Staging, host_views, in_hugepages
from hetero.cpu_experts.jobs import EngineConfig, EngineStats, Job
from hetero.cpu_experts.ring import YIELD, DecodeRing, RingFuture

log = logging.getLogger(__name__)
INPUT_TIMEOUT_S = 60.0  # a decode job whose inputs take longer than this to land is an error
# a caller polls a part's flag in numba, without the GIL, this long at a time (the worker's
# Python between two queued jobs then never waits on a polling caller for the GIL)
SPIN_SLICE_S = 1e-4
RING_IDLE_S = 5e-3  # a ring's server returns to Python after this long without a job


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
        self._staging = Staging()  # see `stage`
        self._identity: dict[int, np.ndarray] = {}  # layer -> rows [E] = arange, for submit
        self._ones: dict[torch.device, torch.Tensor] = {}  # the `arrived` flag's source
        self._pinned = PinnedBuffers()  # CUDA callers' job buffers, recycled
        self._cycles_per_s = kernels_q8.cycle_rate()  # the cycle counter's ticks a second
        self._clock = (kernels_q8.read_cycles(), time.perf_counter_ns())  # cycles <-> ns
        self._rings: dict[int, DecodeRing] = {}  # by experts a token
        self._ring_lock = threading.Lock()
        self._ring_tokens = DecodeRing.tokens_for(self.layers, self.config)  # 0: no ring
        self._ring_limit = self._ring_tokens
        # ring jobs whose busiest expert has this many tokens go to the GEMM paths (0: none)
        self.ring_heavy = self._threshold(any_layer) if self.config.ring_gemm else 0
        self._worker = 0  # the worker thread's id
        self._pool = ThreadPoolExecutor(1, "hetero-cpu-experts", initializer=self._init_worker)
        self._pool.submit(self._warm_up, any_layer).result()

    def _init_worker(self) -> None:
        numba.set_num_threads(self.threads)  # numba's setting is per calling thread
        threading.current_thread().name = "hetero-cpu-experts"
        self._worker = threading.get_ident()

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
        if self._ring_tokens:  # the ring's server, on a throwaway ring of one slot's job
            ring = DecodeRing(self.layers, 1, 1, pin=False)
            for t in (ring.x, ring.ids, ring.w):
                t.zero_()  # (expert 0, weight 0)
            s = ring.take()
            ring.fill(s, next(iter(self.layers)), 1, 0, rows)
            ring.arrived.fill_(1)
            ring.publish()
            self._serve(ring, idle_s=0.0)
            RingFuture(ring, s, 0).result()  # (raises what failed)

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
        parts = 2 if deferred else 1
        with self._ring_lock:  # (a slot and its sequence number for one caller at a time)
            taken = self._ring_for(layer, x, ids)
            if taken is not None:
                return self._submit_ring(*taken, layer, x, ids, weights, rows, deferred, start)
        self._yield_rings(1)  # a job off the ring: its server makes way
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
        self._copy_inputs(host, arrived, x, ids, weights)
        self.stats.mark("copies", copies)
        self.stats.mark("submit", start)
        recycle = partial(self._pinned.give, specs, buffer) if x.is_cuda else None
        return Job(outs, done, future, x.device, x.dtype, np.zeros(parts, bool), recycle)

    def _submit_ring(self, ring, s, layer, x, ids, weights, rows, deferred, start) -> Job:
        T, parts = x.shape[0], 2 if deferred else 1
        ring.fill(s, layer, T, deferred, rows)
        self.stats.mark("alloc", start)
        host, arrived, outs, done_flags = ring.views(s, T, parts)
        self._copy_inputs(host, arrived, x, ids, weights)
        future = RingFuture(ring, s, ring.seq)
        if ring.publish():
            self._pool.submit(self._serve, ring)
        self.stats.mark("submit", start)
        done = partial(self._ring_done, ring, s, layer)
        waited = np.zeros(parts, bool)
        job = Job(outs, done_flags, future, x.device, x.dtype, waited, done, shared=True)
        weakref.finalize(job, ring.abandon, s, future.seq, waited)  # a job dropped unwaited
        return job

    def _ring_for(self, layer: int, x: torch.Tensor, ids: torch.Tensor):
        """(the ring, its free slot) for this job, or None: not ring-sized, or no slot free."""
        if not 0 < x.shape[0] <= self._ring_limit or ids.ndim != 2:
            return None
        k = ids.shape[1]
        if k not in self._rings:
            pin = torch.cuda.is_available()  # (for CUDA callers, whoever comes first)
            self._rings[k] = DecodeRing(self.layers, self._ring_tokens, k, pin)
        s = self._rings[k].take()
        return None if s is None else (self._rings[k], s)

    @property
    def ring_limit(self) -> int:
        """Jobs of up to this many tokens take the ring (at most its slots' size, 0: none);
        settable between steps (bench/throughput.py --ring-levels)."""
        return self._ring_limit

    @ring_limit.setter
    def ring_limit(self, tokens: int) -> None:
        self._ring_limit = max(0, min(tokens, self._ring_tokens))

    def _serve(self, ring: DecodeRing, idle_s: float = RING_IDLE_S) -> None:
        """The ring's server, on the worker thread; a job that fails there fails alone."""
        c, layer = self.config, next(iter(self.layers.values()))
        rate = self._cycles_per_s
        # ring_heavy: a job with an expert of this many tokens is handed back to the GEMM paths
        # (a decode step of 64 requests under V3 serving's skew sends 20-40 tokens to its
        # hottest experts; 2026-12-04, H200: TPOT 4.8 s all on the GEMV against 3.2 s with
        # those on the AMX tiles)
        args = (c.rows_per_item, ops._q8_offset(layer, True), c.prefetch_bytes,
                int(INPUT_TIMEOUT_S * rate), int(idle_s * rate), self.ring_heavy)  # fmt: skip
        while True:
            try:
                if ring.run(*args):
                    self._handed_back(ring)
                    continue
                return
            except Exception as e:  # noqa: BLE001 (the job's caller gets it from `wait`)
                log.error("a CPU expert job failed on the ring: %s", e)
                if not ring.fail_head(e):
                    return

    def _handed_back(self, ring: DecodeRing) -> None:
        """The ring's head job, which has an expert for the GEMM paths: computed here, in the
        slot's buffers, as a queued job would be (its parts published together at the end)."""
        s, position, T, deferred = ring.head_job()
        parts = 2 if deferred else 1
        (x, ids, w), arrived, outs, _ = ring.views(s, T, parts)
        done = np.zeros(parts, np.int64)  # (published by hand_back, after the stamps)
        self._compute(self.layers[ring.layers[position]], x.numpy(), ids.numpy(), w.numpy(),
                      ring.rows[s], deferred, outs.numpy(), done, arrived.numpy())  # fmt: skip
        ring.hand_back(s, int(ring.stamps[s, 1]), kernels_q8.read_cycles(), parts)
        self.stats.handed_back += 1

    def _yield_rings(self, flag: int) -> None:
        """Asks the rings' servers to return to Python once their jobs are done (1), or not."""
        for r in self._rings.values():
            r.ctrl[YIELD] = flag

    def _ring_done(self, ring: DecodeRing, s: int, layer: int, event) -> None:
        """A ring job waited for in full: its slot back to the ring, its times to the stats."""
        start, arrived, end = (int(v) for v in ring.stamps[s, :3])
        ring.release(s, event)
        if end < arrived:  # (it failed)
            return
        busy = (end - arrived) / self._cycles_per_s
        self.stats.busy_s += busy
        self.stats.compute_s += busy
        self.stats.jobs += 1
        if self.stats.trace is not None:
            c0, ns0 = self._clock
            ns = [ns0 + int((c - c0) / self._cycles_per_s * 1e9) for c in (start, arrived, end)]
            if ns[1] > ns[0]:
                self.stats.mark("input", ns[0], ns[1], self._worker)
            self.stats.mark(f"L{layer}", ns[1], ns[2], self._worker)

    def wait(self, job: Job, part: int = 0) -> torch.Tensor:
        """Part `part` of the job's sum, on the caller's device. Polls the part's flag (without
        the GIL, SPIN_SLICE_S at a time, for EngineConfig.caller_spin_s, then napping between
        polls): part 0 of a decode job is taken as soon as the kernel has written it, while the
        worker goes on with the deferred part."""
        start = time.perf_counter_ns()
        spin_until = start + int(self.config.caller_spin_s * 1e9)
        flag, cycles = job.done[part : part + 1], int(SPIN_SLICE_S * self._cycles_per_s)
        while fused.wait_inputs(flag, cycles) < 0:
            if job.future.done():
                job.future.result()  # the worker's error, if it had one
                if not job.done[part]:
                    raise RuntimeError(f"the job ended without computing part {part}")
            if time.perf_counter_ns() > spin_until:
                cycles = 0  # from here on one look a nap
                time.sleep(self.config.caller_nap_s)
        self.stats.wait_s += (time.perf_counter_ns() - start) / 1e9
        self.stats.mark("wait", start)
        out = job.outs[part].to(device=job.device, dtype=job.dtype, non_blocking=True)
        if job.shared and out.data_ptr() == job.outs[part].data_ptr():
            out = out.clone()  # (a CPU caller: the slot is the next job's)
        job.waited[part] = True
        if job.recycle is not None and job.waited.all():
            event = None
            if job.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()  # after the copy out of it
            job.recycle(event)
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
        stream take them to `device` (host_buffers.Staging)."""
        self._yield_rings(1)
        host = self._pool.submit(self._staging.fill, self.layers[layer]).result()
        return self._staging.to(host, device)

    def on_worker(self, fn, *args) -> Future:
        """fn(*args) on the engine's worker thread, after the jobs queued before it (its numba
        calls use all the engine's threads): e.g. staging.GroupStaging.fill."""
        self._yield_rings(1)
        return self._pool.submit(fn, *args)

    def _copy_inputs(self, host, arrived: torch.Tensor, x, ids, weights) -> None:
        """x, ids, weights into their host views (copy_ converts the dtype), then `arrived`
        set: by the caller's stream once the copies are done for CUDA inputs."""
        for h, t in zip(host, (x, ids, weights)):
            h.copy_(t, non_blocking=x.is_cuda)
        if not x.is_cuda:
            arrived.fill_(1)
            return
        if x.device not in self._ones:
            self._ones[x.device] = torch.ones(1, dtype=torch.int64, device=x.device)
        arrived.copy_(self._ones[x.device], non_blocking=True)

    def _run(self, layer: int, host, arrived, rows, deferred: int, outs, done) -> None:
        start, waited = time.perf_counter_ns(), 0  # waited: ns idle before the inputs landed
        self._yield_rings(0)  # (this job is running)
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
        threshold = self._threshold(layer) if gemm_min_tokens is None else gemm_min_tokens
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
                layer, x, weights, heavy_g, out, self._amx_scratch, c.amx_prefetch_bytes,
                self.stats.amx_s, c.amx_int4_tiles, c.amx_bf16_order,
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

    def _threshold(self, layer: PackedExperts) -> int:
        """Tokens from which an expert of this layer takes the GEMM path."""
        c = self.config
        if self._tiles(layer):
            return c.gemm_min_tokens_amx
        q8 = c.int8_activations and ops.q8_activations(layer)
        return c.gemm_min_tokens_q8 if q8 else c.gemm_min_tokens

    def _tiles(self, layer: PackedExperts) -> bool:
        return self.config.amx and ops.amx_ok(layer) and amx.enable()
