"""A MoE layer's GPU-resident routed experts kept in the CPU's packed int4 (placement
`gpu_format: int4-gG`): a quarter of bf16's bytes, so a card holds twice the experts FP8 would,
computed from the packed bytes by `fused_moe_int4` (W4A16); elsewhere (CPU tensors) by
dequantizing each used expert (`streamed_experts`, the kernel's reference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hetero.cpu_experts.formats import PackedExperts, as_tensor
from hetero.model.fp8 import KERNEL_MAX_TOKENS as GRAPH_TOKENS  # (decode sizes)
from hetero.model.moe import RoutedRun


class PackedGPUExperts:
    """`packed` holds experts `experts` (row i = expert experts[i]) of a layer of `num_experts`;
    its arrays are copied to `device` once; `replace` puts another expert in a slot."""

    def __init__(
        self,
        packed: PackedExperts,
        experts: Sequence[int],
        num_experts: int,
        device: torch.device | str,
    ) -> None:
        if packed.fmt.name != "int4":
            raise ValueError(f"GPU-resident packed experts are int4, not {packed.fmt}")
        self.packed, self.experts = packed, tuple(experts)
        self.arrays = [as_tensor(a).to(device) for a in packed.arrays().values()]
        local = torch.full((num_experts,), -1, dtype=torch.int32)
        local[list(self.experts)] = torch.arange(len(self.experts), dtype=torch.int32)
        self.local = local.to(device)  # [E] expert id -> row, -1: not here

    def replace(self, slot: int, expert: int, rows: Sequence[np.ndarray]) -> int:
        """Slot `slot` takes expert `expert`: its packed rows (w13, s13, w2, s2 of one expert,
        host arrays in this layout, e.g. the CPU engine's) copied in place, so the arrays keep
        their addresses (a kernel or graph holding them sees the new expert). Returns the
        expert the slot held. Between steps only: the copies are queued on the current stream
        behind the kernels already there. `packed` (the host copy) is kept current too."""
        if expert in self.experts:
            raise ValueError(f"expert {expert} is already in slot {self.experts.index(expert)}")
        old = self.experts[slot]
        for host, dev, src in zip(self.packed.arrays().values(), self.arrays, rows, strict=True):
            if src.shape != host.shape[1:] or src.dtype != host.dtype:
                raise ValueError(
                    f"expert {expert}: a row of {src.dtype}{list(src.shape)}, the slots hold "
                    f"{host.dtype}{list(host.shape[1:])}"
                )
            t = as_tensor(np.ascontiguousarray(src))
            if dev.is_cuda:  # pinned: an asynchronous copy (the caching host allocator keeps
                t = t.pin_memory()  # the block until the copy is done)
            dev[slot].copy_(t, non_blocking=dev.is_cuda)
            if dev.data_ptr() != host.ctypes.data:  # (on the CPU `arrays` are `packed`'s)
                host[slot] = src
        self.local[old] = -1
        self.local[expert] = slot
        self.experts = (*self.experts[:slot], expert, *self.experts[slot + 1 :])
        return old

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.arrays)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> these experts' weighted sum [T, H] in x's dtype
        (slots whose expert is elsewhere, or -1, count zero)."""
        if x.is_cuda:
            from hetero.gpu.fused_moe import fused_moe_int4  # triton: imported where it runs
            from hetero.gpu.moe_align import on_local_pairs

            G = self.packed.fmt.group_size
            if x.shape[0] <= GRAPH_TOKENS:  # decode: no host sync (CUDA graphs)
                return fused_moe_int4(x, ids, weights, self.local, *self.arrays, G)
            moe = lambda xs, i, w: fused_moe_int4(xs, i, w, self.local, *self.arrays, G,  # noqa: E731
                                                  out_dtype=torch.float32)  # fmt: skip
            return on_local_pairs(moe, x, ids, weights, self.local).to(x.dtype)
        from hetero.sched.hybrid import streamed_experts

        rows = self.local[ids.clamp_min(0)].long().masked_fill(ids < 0, -1)  # [T, k]
        return streamed_experts(self.packed, x, rows, weights, self.arrays)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> RoutedRun:
        """The routed backend of a layer whose experts are all here."""
        y = self(x, ids, weights)
        return RoutedRun(lambda: y)
