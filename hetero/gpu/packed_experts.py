"""A MoE layer's GPU-resident routed experts kept in the CPU's packed int4 (placement
`gpu_format: int4-gG`): a quarter of bf16's bytes, so a card holds twice the experts FP8 would,
computed from the packed bytes by `fused_moe_int4` (W4A16); elsewhere (CPU tensors) by
dequantizing each used expert (`streamed_experts`, the kernel's reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetero.cpu_experts.formats import PackedExperts, as_tensor
from hetero.model.moe import RoutedRun


class PackedGPUExperts:
    """`packed` holds experts `experts` (row i = expert experts[i]) of a layer of `num_experts`;
    its arrays are copied to `device` once."""

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

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.arrays)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> these experts' weighted sum [T, H] in x's dtype
        (slots whose expert is elsewhere, or -1, count zero)."""
        if x.is_cuda:
            from hetero.gpu.fused_moe import fused_moe_int4  # triton: imported where it runs

            w13, s13, w2, s2 = self.arrays
            return fused_moe_int4(x, ids, weights, self.local, w13, s13, w2, s2,
                                  self.packed.fmt.group_size)  # fmt: skip
        from hetero.sched.hybrid import streamed_experts

        rows = self.local[ids.clamp_min(0)].long().masked_fill(ids < 0, -1)  # [T, k]
        return streamed_experts(self.packed, x, rows, weights, self.arrays)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> RoutedRun:
        """The routed backend of a layer whose experts are all here."""
        y = self(x, ids, weights)
        return RoutedRun(lambda: y)
