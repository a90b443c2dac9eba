"""A MoE layer's GPU-resident routed experts: their FP8 weights stacked, run by
`fp8_expert_gemm` over the fixed tokens x top-k slots at decode sizes and by the grouped GEMM
of `fused_moe_fp8` beyond (prefill). No host sync and no Python loop over
experts, so the work is a handful of launches (and can be captured in a CUDA graph); the
per-expert reference loop (`torch_routed_experts`) reads the chosen ids back to the host and
launches ~10 ops an expert, which on the H100 cost ~0.8 ms a layer at batch 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetero.gpu.fp8_gemm import fp8_expert_gemm
from hetero.gpu.fused_moe import fused_moe_fp8
from hetero.gpu.moe_align import on_local_pairs
from hetero.model.fp8 import KERNEL_MAX_TOKENS, FP8Linear


class StackedFP8Experts:
    """The experts of `experts` (MLP modules keyed by expert id, FP8Linear projections) as
    stacked tensors; the modules' parameters become views of the stacks (no second copy).
    `num_experts`: the router's expert count."""

    def __init__(self, experts: nn.ModuleDict, num_experts: int) -> None:
        mods = [experts[k] for k in experts]
        first = mods[0]
        self.block = first.gate_proj.block
        self.inter = first.gate_proj.out_features
        gate_up = [torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mods]
        gate_up_s = [torch.cat([m.gate_proj.weight_scale_inv, m.up_proj.weight_scale_inv])
                     for m in mods]  # fmt: skip
        self.w13, self.s13 = torch.stack(gate_up), torch.stack(gate_up_s)  # [n, 2I, H], [n, ., .]
        self.w2 = torch.stack([m.down_proj.weight for m in mods])  # [n, H, I]
        self.s2 = torch.stack([m.down_proj.weight_scale_inv for m in mods])
        I, bi = self.inter, self.inter // self.block[0]
        for i, m in enumerate(mods):
            m.gate_proj.weight.data, m.up_proj.weight.data = self.w13[i, :I], self.w13[i, I:]
            m.gate_proj.weight_scale_inv.data = self.s13[i, :bi]
            m.up_proj.weight_scale_inv.data = self.s13[i, bi:]
            m.down_proj.weight.data, m.down_proj.weight_scale_inv.data = self.w2[i], self.s2[i]
        local = torch.full((num_experts,), -1, dtype=torch.int32)
        local[[int(k) for k in experts]] = torch.arange(len(mods), dtype=torch.int32)
        self.local = local.to(self.w13.device)  # [E] expert id -> stack index, -1: not here

    @staticmethod
    def supports(experts: nn.ModuleDict) -> bool:
        """FP8 projections whose gate and up scale blocks do not straddle each other."""
        mods = list(experts.values())
        return (
            bool(mods)
            and all(
                isinstance(p, FP8Linear)
                for m in mods
                for p in (m.gate_proj, m.up_proj, m.down_proj)
            )
            and mods[0].gate_proj.out_features % mods[0].gate_proj.block[0] == 0
        )

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> the GPU experts' weighted sum [T, H] in x's dtype
        (slots whose expert is elsewhere, or -1, count zero). Up to KERNEL_MAX_TOKENS tokens
        a GEMV per (token, slot) row; more, the grouped GEMM over tokens sorted by expert."""
        T, k = ids.shape
        if T > KERNEL_MAX_TOKENS:  # prefill: the grouped GEMM on the local pairs
            stacks = (self.w13, self.s13, self.w2, self.s2, self.block)
            moe = lambda xs, i, w: fused_moe_fp8(xs, i, w, self.local, *stacks,  # noqa: E731
                                                 out_dtype=torch.float32)  # fmt: skip
            return on_local_pairs(moe, x, ids, weights, self.local).to(x.dtype)
        slot = self.local[ids.clamp_min(0)].masked_fill(ids < 0, -1).reshape(-1)  # [T k]
        xs = x.repeat_interleave(k, dim=0)  # [T k, H]
        gu = fp8_expert_gemm(xs, slot, self.w13, self.s13, self.block)  # [T k, 2I]
        h = F.silu(gu[:, : self.inter]) * gu[:, self.inter :]
        out = fp8_expert_gemm(h, slot, self.w2, self.s2, self.block).view(T, k, -1)
        w = weights.masked_fill(slot.view(T, k) < 0, 0).to(out.dtype)
        return (out * w[..., None]).sum(1)
