"""The hybrid routed-experts backend: a layer's experts split between the GPU and the CPU engine,
the two overlapped, and the lowest-weight CPU experts optionally deferred to the next layer.

One MoE layer, as `MoE.forward` drives it (see "One decode step" in DESIGN.md):
  router (GPU) -> `submit`: CPU experts sent to the engine through pinned buffers (returns at
  once), deferred ones queued right behind them, GPU-resident experts launched -> the GPU runs the
  shared experts meanwhile -> `result()` waits for the CPU sum and adds it.
The deferred job runs on the CPU while the GPU computes the next layer's attention; that layer's
MoE adds it (`pending.result()`), the last one before the final norm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero.cpu_experts.engine import CPUExperts, Job
from hetero.cpu_experts.formats import PackedExperts, as_tensor, dequantize_tensors
from hetero.cpu_experts.staging import GroupStaging
from hetero.gpu.packed_experts import PackedGPUExperts
from hetero.model.moe import RoutedRun, torch_routed_experts
from hetero.sched.prefill_policy import Split, split
from hetero.sched.rates import Rates
from hetero.sched.streaming import stream_experts


def streamed_experts(
    layer: PackedExperts,
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    arrays: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The CPU's experts computed on x's device instead: the packed layer crosses PCIe (int4 is
    a quarter of bf16's bytes). For long prefill, where the CPU is compute-bound. x [T, H],
    rows/weights [T, k] (-1: skip); `arrays`: the layer's arrays already on x's device
    (CPUExperts.stage). On CUDA an int4 layer runs from its packed bytes (fused_moe_int4);
    otherwise each used expert is dequantized (`dequantized_experts`, the kernel's reference)."""
    arrays = arrays or [as_tensor(a).to(x.device) for a in layer.arrays().values()]
    if x.is_cuda and layer.fmt.name == "int4":
        from hetero.gpu.fused_moe import fused_moe_int4  # triton: imported where it runs

        local = torch.arange(layer.w13.shape[0], dtype=torch.int32, device=x.device)
        return fused_moe_int4(x, rows, weights, local, *arrays, layer.fmt.group_size)
    return dequantized_experts(layer, x, rows, weights, arrays)


def dequantized_experts(
    layer: PackedExperts,
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    arrays: list[torch.Tensor],
) -> torch.Tensor:
    """Each used row of the packed layer (arrays on x's device) dequantized and applied to its
    tokens: x [T, H], rows/weights [T, k] (-1: skip) -> [T, H]."""
    dtype = x.dtype
    w13, s13, w2, s2 = arrays
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for r in rows.unique().tolist():
        if r < 0:
            continue
        t, slot = torch.nonzero(rows == r, as_tuple=True)  # [n], [n]
        gate_up = dequantize_tensors(w13[r], s13[r], layer.fmt, layer.hidden, dtype)  # [I, 2, H]
        down = dequantize_tensors(w2[r], s2[r], layer.fmt, layer.inter, dtype)  # [H, I]
        gu = x[t] @ gate_up.flatten(0, 1).T  # [n, 2I], gate and up interleaved by row
        h = F.silu(gu[:, 0::2]) * gu[:, 1::2]
        y.index_add_(0, t, (h @ down.T).float() * weights[t, slot, None].float())
    return y.to(dtype)


def count_routes(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """counts [E] += each expert's routes in ids [T, k] (-1: none), on ids' device and without
    a host sync (CUDA's bincount reads the largest id back to size its output)."""
    flat = ids.reshape(-1)  # [T*k]
    counts.index_add_(0, flat.clamp_min(0), (flat >= 0).to(counts.dtype))


@dataclass(frozen=True)
class CPUPending:
    """Deferred CPU experts in flight (part 1 of the layer's job); `result()` waits for their
    sum [T, H]."""

    engine: CPUExperts
    job: Job

    def result(self) -> torch.Tensor:
        return self.engine.wait(self.job, part=1)


DEFER_MAX_TOKENS = 8  # a step's tokens up to which deferral applies
# with measured rates (HybridOptions.calibration), chunks of this many tokens or more ask the
# prefill policy where their CPU experts run. Its counts cost a host sync, which a decode step
# should not pay: above the CUDA-graph decode buckets (64 by default). Below it the CPU wins
# anyway when the experts it streams are first gathered into the staging slots by the CPU
# engine's threads (V3 on the H200: 64 tokens 55-60 ms a layer on the CPU, ~100 ms to stream
# the ~220 experts they use).
POLICY_MIN_TOKENS = 128
# With the experts page-locked in place (runtime.pin_experts: no gather, PCIe reads them
# directly) steps of this many tokens ask the policy too: a serving step of 64 requests sends
# 20-40 of its tokens to its hottest experts, which cost the CPU their tokens' compute and the
# GPU only their bytes (~0.5 ms an int4 V3 expert at ~50 GB/s), while the CPU reads the rest;
# the host sync is well under 1% of such a step's MoE layer. Whole V3 on the H200, 2026-12-04
# (bench/results/2026-12-04-h200-decode-policy.md): concurrency 64 TPOT 2.6-2.7 -> 1.5-1.6 s,
# the CPU's read share 0.58-0.60 -> 0.92-0.96; concurrency 16 (asking from 16) 945 -> 721 ms.
DIRECT_POLICY_MIN_TOKENS = 16


class HybridExperts:
    """Routed experts of one MoE layer: `experts` (the GPU-resident ones, as modules) on the
    model's device, or `gpu` (packed ones: PackedGPUExperts), the rest in `engine` (layer
    `layer`), whose rows are the experts `cpu_rows` lists (default: all, row e = expert e).
    `deferred`: CPU experts a token hands to the next layer; `overlap=False` waits for the CPU
    before any GPU work (the sequential baseline of bench/decode.py)."""

    def __init__(
        self,
        experts: nn.ModuleDict,
        *,
        layer: int,
        engine: CPUExperts,
        num_experts: int,
        cpu_rows: tuple[int, ...] | None = None,
        deferred: int = 0,
        overlap: bool = True,
        stream_min_tokens: int = 0,
        gpu: PackedGPUExperts | None = None,
        staging: GroupStaging | None = None,
        rates: Rates | None = None,
        policy_min_tokens: int | None = None,
    ) -> None:
        self.experts, self.gpu = experts, gpu
        self.stream_min_tokens = stream_min_tokens  # 0: never stream the CPU's experts
        # streamed prefill's bounded double-buffered staging (shared by the layers); None: the
        # whole packed layer through the engine's one buffer (CPUExperts.stage)
        self.staging = staging
        # measured rates: long chunks go where prefill_policy.split says (cpu / gpu / split)
        # instead of by stream_min_tokens; `modes` counts its choices
        self.rates, self.modes = rates, Counter()
        # steps of this many tokens ask the policy (None: DIRECT_POLICY_MIN_TOKENS with
        # page-locked experts, else POLICY_MIN_TOKENS); `last_split`: its answer for the last
        # step submitted, None where the step did not ask (bench/serving_load.StepProbe)
        direct = staging is not None and staging.direct
        default = DIRECT_POLICY_MIN_TOKENS if direct else POLICY_MIN_TOKENS
        self.policy_min_tokens = default if policy_min_tokens is None else policy_min_tokens
        self.last_split: Split | None = None
        self.layer = layer
        self.engine = engine
        self.deferred = deferred
        # False: each token defers its own slots even where another token's part 0 reads that
        # expert anyway (kernels.split_parts, d < 0) -- batch 1's deferral, which `hetero eval`
        # scores; True (serving): an expert is never read twice in one step
        self.share_deferral = True
        # steps of more tokens defer nothing: at batch 16 and 64 (V3, H200, 2026-12-03) the
        # split job ran 20-33% slower than the whole one, its deferred part too small to
        # occupy the cores; at batch 1 deferral gains (bench/results/*serve_v3.md)
        self.defer_max_tokens = DEFER_MAX_TOKENS
        self.overlap = overlap
        on_gpu = torch.zeros(num_experts, dtype=torch.bool)
        on_gpu[[int(e) for e in experts.keys()] + list(gpu.experts if gpu else ())] = True
        rows = torch.full((num_experts,), -1, dtype=torch.long)  # expert id -> engine row
        cpu_rows = range(num_experts) if cpu_rows is None else cpu_rows
        rows[list(cpu_rows)] = torch.arange(len(cpu_rows))
        rows[on_gpu] = -1
        self.on_gpu, self.rows = on_gpu, rows  # [E] each, moved to the inputs' device on first use
        self.rows_np = rows.numpy()  # the same, for the engine
        self.any_on_gpu = bool(on_gpu.any())
        self._stacked = None  # StackedFP8Experts once built, False where it does not apply
        # [E] int64 on the inputs' device: routes to each expert since HotExperts last read
        # them (hetero.sched.hot_experts); None: not counted
        self.counts: torch.Tensor | None = None

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> RoutedRun:
        """x [T, H], ids/weights [T, k] from the router."""
        if self.counts is not None:
            count_routes(self.counts, ids)
        if self.on_gpu.device != ids.device:
            self.on_gpu, self.rows = self.on_gpu.to(ids.device), self.rows.to(ids.device)
        self.last_split = None
        if self.rates is not None and x.shape[0] >= self.policy_min_tokens:  # (set on CUDA)
            return self._by_policy(x, ids, weights)
        if x.is_cuda and 0 < self.stream_min_tokens <= x.shape[0]:
            return self._streamed(x, ids, weights)
        # first the CPU's job, so that its input copy is queued right behind the router; the
        # engine's kernel picks each token's deferred slots (kernels.split_parts)
        d = self.deferred if x.shape[0] <= self.defer_max_tokens else 0
        deferred = d if self.share_deferral else -d
        job = self.engine.submit(self.layer, x, ids, weights, self.rows_np, deferred)
        if not self.overlap:
            y_cpu = self.engine.wait(job)
        pending = CPUPending(self.engine, job) if d else None
        if self.overlap and not self.any_on_gpu:  # no zeros to add the CPU's sum to
            return RoutedRun(lambda: self.engine.wait(job), pending)
        y = self._gpu_experts(x, ids, weights)
        if not self.overlap:
            return RoutedRun(lambda: y + y_cpu, pending)
        return RoutedRun(lambda: y + self.engine.wait(job), pending)

    def reassign(self, rows: np.ndarray) -> None:
        """Between steps only (no job of this layer in flight): the engine's rows [E] int64
        change, -1 for the experts now on the GPU (HotExperts after a swap). `rows_np` is
        replaced, not written: a queued job keeps the array it was given; the tensors are
        written in place (on the device, in stream order)."""
        if rows.shape != self.rows_np.shape or (rows < 0).sum() != int(self.on_gpu.sum()):
            raise ValueError(f"rows must be [{len(self.rows_np)}] with the GPU's count of -1")
        self.rows_np = rows.astype(np.int64)  # (a copy)
        host = torch.from_numpy(self.rows_np)
        self.rows.copy_(host.to(self.rows.device))
        self.on_gpu.copy_((host < 0).to(self.on_gpu.device))

    def _gpu_experts(self, x, ids, weights) -> torch.Tensor:
        if not self.any_on_gpu:
            return torch.zeros_like(x)
        if self.gpu is not None:
            return self.gpu(x, ids, weights)
        if x.is_cuda and self._stacked is not False:
            if self._stacked is None:  # triton only where CUDA is
                from hetero.gpu.experts import StackedFP8Experts

                ok = StackedFP8Experts.supports(self.experts)
                self._stacked = StackedFP8Experts(self.experts, len(self.rows)) if ok else False
            if self._stacked:  # no host sync, a few launches for all GPU experts
                return self._stacked(x, ids, weights)
        gpu = self.on_gpu[ids]  # [T, k]
        return torch_routed_experts(self.experts, x, ids.masked_fill(~gpu, -1), weights)

    def _by_policy(self, x, ids, weights) -> RoutedRun:
        """A long chunk (or, with page-locked experts, a large decode step): its CPU experts
        on the CPU, streamed to the GPU, or split between them, as prefill_policy.split
        decides from the step's tokens per expert."""
        rows = self.rows[ids]  # [T, k] the engine's rows, -1 for GPU experts
        packed = self.engine.layers[self.layer]
        used = rows[rows >= 0].cpu().numpy()  # (a host sync: long chunks only)
        counts = np.bincount(used, minlength=packed.num_experts)  # [rows]
        slot = self.staging.slot_bytes if self.staging is not None else 0
        gathers = self.staging is not None and not self.staging.direct
        s = split(self.rates, str(packed.fmt), counts, packed.expert_bytes(),
                  staged=gathers, slot_bytes=slot)  # fmt: skip
        self.modes[s.mode] += 1
        self.last_split = s
        if s.mode == "gpu":
            return self._streamed(x, ids, weights)
        if s.mode == "cpu" or self.staging is None:
            job = self.engine.submit(self.layer, x, ids, weights, self.rows_np, 0)
            y = self._gpu_experts(x, ids, weights)
            return RoutedRun(lambda: y + self.engine.wait(job))
        cpu_rows = np.where(self.rows_np >= 0, self.rows_np, 0)
        cpu_map = np.where((self.rows_np >= 0) & s.on_cpu[cpu_rows], self.rows_np, -1)  # [E]
        on_cpu = torch.from_numpy(s.on_cpu).to(rows.device)
        gpu_rows = rows.masked_fill((rows < 0) | on_cpu[rows.clamp_min(0)], -1)  # [T, k]
        jobs = []

        def cpu_part() -> None:  # queued behind the gathers: runs beside the GPU's compute
            jobs.append(self.engine.submit(self.layer, x, ids, weights, cpu_map, 0))

        y = stream_experts(self.engine, self.staging, self.layer, x, gpu_rows, weights, cpu_part)
        y = y + self._gpu_experts(x, ids, weights) if self.any_on_gpu else y
        return RoutedRun(lambda: y + self.engine.wait(jobs[0]))

    def _streamed(self, x, ids, weights) -> RoutedRun:
        """Long prefill: the CPU's experts streamed to the GPU and computed there (exact, nothing
        deferred)."""
        rows = self.rows[ids]  # [T, k] the engine's rows, -1 for GPU experts
        packed = self.engine.layers[self.layer]
        if self.staging is not None:  # only the routed experts, in groups, overlapped
            y = stream_experts(self.engine, self.staging, self.layer, x, rows, weights)
        else:
            y = streamed_experts(packed, x, rows, weights, self.engine.stage(self.layer, x.device))
        y = y + self._gpu_experts(x, ids, weights) if self.any_on_gpu else y
        return RoutedRun(lambda: y)
