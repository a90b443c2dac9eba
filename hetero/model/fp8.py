"""FP8 weights on the GPU: DeepSeek-V3's checkpoint format kept as is (float8_e4m3fn + a float32
scale per 128x128 block), half the bytes of bf16.

`FP8Linear` on CUDA reads the FP8 weight as stored: a few tokens (decode) with
`hetero.gpu.fp8_gemm` (W8A16, memory-bound), more (prefill) with `hetero.gpu.fp8_prefill`
(activations quantized per token per 128 to e4m3, then e4m3 tensor cores, as DeepSeek-V3's own
inference does: cuBLAS's block-scaled GEMM where torch has it, else the Triton kernel;
flashinfer's SM90 one where asked: `PREFILL_GEMMS`).
On the CPU it dequantizes the weight and runs a plain matmul: the simple path, and the kernels'
reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # largest float8_e4m3fn
KERNEL_MAX_TOKENS = 64  # up to this many rows of x, CUDA uses the FP8 kernel (memory-bound)
# FP8Linear's rows up to which the W8A16 kernel beats cuBLAS's FP8 GEMM (H200, V3's matrices:
# on par at 16 rows, 1.4x slower at 32, 2-4x at 64)
GEMV_MAX_TOKENS = 16
# past the GEMV, up to this many rows the swap-AB FP8 kernel (hetero.gpu.fp8_small) instead of
# cuBLAS's block-scaled GEMM: 0 (off) until it is measured against cuBLAS on the GPU; the bench
# turns it on per layer (`FP8Linear.small_max_tokens`, bench/decode.py --fp8-small)
SMALL_MAX_TOKENS = 0
# past those rows, the GEMMs tried in this order (hetero.gpu.fp8_prefill.ROUTES; a layer keeps
# the first that takes its shape): cuBLAS's block-scaled GEMM measured 1.3-1.9x the Triton
# kernel (H200, 2026-12-03); flashinfer's ("flashinfer", >= 0.6) is not yet measured here, so
# it runs only where asked (`FP8Linear.prefill_gemms`, bench/prefill.py --fp8-gemms)
PREFILL_GEMMS = ("cublas", "triton")


def block_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
    """W = W_fp8 * scale per block: w [O, I], scale_inv [ceil(O/bo), ceil(I/bi)] -> fp32 [O, I].
    Edge blocks may be partial (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows)."""
    O, I = w.shape
    bo, bi = block
    scale = scale_inv.float().repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :I]
    return w.float() * scale


def block_quantize(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (float8_e4m3fn [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)]) with
    W ~= W_fp8 * scale per block; scale = amax(block) / 448; edge blocks may be partial."""
    N, K = w.shape
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb, kb]; zero padding never raises the max
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nb * bn, kb * bk)[:N, :K].to(torch.float8_e4m3fn).contiguous()
    return q, scale


class FP8Linear(nn.Module):
    """y = x W^T with W stored as FP8 blocks; parameter names as in the checkpoint."""

    def __init__(
        self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128)
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        scale_shape = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(torch.empty(scale_shape), requires_grad=False)
        self.prefill_gemms = PREFILL_GEMMS  # the GEMMs past small_max_tokens, in order
        self.prefill_gemm: str | None = None  # the first of them that took this layer (CUDA)
        self.counters: torch.Tensor | None = None  # the GEMV's split-K tile counters (CUDA)
        self.tiles = None  # the GEMV's launch settings (fp8_gemm.Tiles; None: its default)
        self.small_max_tokens = SMALL_MAX_TOKENS  # rows through fp8_small past the GEMV's

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        (O, I), (bo, bi) = self.weight.shape, self.block
        if O % bo or I % bi:  # partial edge blocks: the general form
            return block_dequantize(self.weight, self.weight_scale_inv, self.block).to(dtype)
        w = self.weight.view(O // bo, bo, I // bi, bi)  # scales broadcast, not expanded
        if dtype in (torch.bfloat16, torch.float16):
            # straight to 16 bits (fp8 -> bf16 is exact): half the bytes of an fp32 detour, for
            # a scale rounded to bf16 (<= 0.4%, against e4m3's own ~3% per weight)
            scale = self.weight_scale_inv.to(dtype)[:, None, :, None]
            return (w.to(dtype) * scale).view(O, I)
        return (w.float() * self.weight_scale_inv[:, None, :, None]).to(dtype).view(O, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return F.linear(x, self.dense_weight(x.dtype))
        if x.numel() <= GEMV_MAX_TOKENS * self.in_features:
            from hetero.gpu.fp8_gemm import fp8_gemm  # triton: only where CUDA is

            return fp8_gemm(x, self.weight, self.weight_scale_inv, self.block, tiles=self.tiles,
                            counters=self.tile_counters(x.device))  # fmt: skip
        if x.numel() <= self.small_max_tokens * self.in_features:
            from hetero.gpu.fp8_small import fp8_small

            # (the GEMV's counters: more than its tiles, never in use by both at once)
            return fp8_small(x, self.weight, self.weight_scale_inv,
                             self.tile_counters(x.device), self.block)  # fmt: skip
        return self.prefill(x)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] on CUDA past the decode kernels' rows: through the first of
        `prefill_gemms` that takes it, tried first on this layer's later calls (the others
        after it, in order, should it refuse one)."""
        from hetero.gpu.fp8_prefill import ROUTES

        names, kept = self.prefill_gemms, self.prefill_gemm
        if kept is not None:
            names = (kept, *(n for n in names if n != kept))
        for name in names:
            y = ROUTES[name](x, self.weight, self.weight_scale_inv, self.block)
            if y is not None:
                self.prefill_gemm = name
                return y
        raise RuntimeError(f"no FP8 GEMM of {list(names)} takes a {self.out_features} x "
                           f"{self.in_features} weight ('triton' takes any)")  # fmt: skip

    def tile_counters(self, device: torch.device) -> torch.Tensor:
        """This layer's own counters for the GEMV's split-K (allocated on first use, which
        CUDA graphs' warm-up runs before capture; one a layer: no two kernels share them)."""
        if self.counters is None or self.counters.device != device:
            from hetero.gpu.fp8_gemm import tile_counters

            self.counters = tile_counters(self.out_features, GEMV_MAX_TOKENS, device)
        return self.counters

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """For a fused SwiGLU gate|up (rows: gate then up): silu(gate x) * (up x). At decode
        sizes on CUDA in the GEMV's own reduction (hetero.gpu.fp8_gemm.fp8_gemm, silu_mul),
        up to `small_max_tokens` in fp8_small's, past them in one kernel after the GEMM
        (hetero.gpu.act.silu_mul)."""
        if x.is_cuda and x.numel() <= GEMV_MAX_TOKENS * self.in_features:
            from hetero.gpu.fp8_gemm import fp8_gemm

            return fp8_gemm(x, self.weight, self.weight_scale_inv, self.block, silu_mul=True,
                            tiles=self.tiles, counters=self.tile_counters(x.device))  # fmt: skip
        if x.is_cuda and x.numel() <= self.small_max_tokens * self.in_features:
            from hetero.gpu.fp8_small import fp8_small

            return fp8_small(x, self.weight, self.weight_scale_inv, self.tile_counters(x.device),
                             self.block, silu_mul=True)  # fmt: skip
        if x.is_cuda:  # past the GEMV's sizes: one activation kernel, not silu then product
            from hetero.gpu.act import silu_mul

            return silu_mul(self(x))
        gate, up = self(x).chunk(2, dim=-1)
        return F.silu(gate) * up


def fuse_fp8(parts: list[nn.Module]) -> FP8Linear | None:
    """One FP8Linear for several that read the same input (q_a and kv_a; gate and up), its
    outputs theirs side by side: at decode one weight stream, one launch, instead of one each.
    The parts' weights and scales become views of the fused ones (no memory added), so they
    still compute on their own. Callers keep the fused module out of the module tree (in the
    instance's __dict__): state_dict, parameter counts and names stay the checkpoint's; fuse
    once the model sits where it runs (`.to()` would move the parts, not it). None where the
    parts do not fuse: not all FP8Linear, different inputs or blocks, or a part (but the last)
    whose rows end inside a scale block."""
    if not parts or not all(type(p) is FP8Linear for p in parts):
        return None
    first = parts[0]
    if any(p.in_features != first.in_features or p.block != first.block for p in parts):
        return None
    if any(p.out_features % first.block[0] for p in parts[:-1]):
        return None
    with torch.device(first.weight.device):
        fused = FP8Linear(first.in_features, sum(p.out_features for p in parts), first.block)
    fused.weight.data = torch.cat([p.weight.data for p in parts])
    fused.weight_scale_inv.data = torch.cat([p.weight_scale_inv.data for p in parts])
    rows = blocks = 0
    for p in parts:
        n, nb = p.weight.shape[0], p.weight_scale_inv.shape[0]
        p.weight.data = fused.weight.data[rows : rows + n]
        p.weight_scale_inv.data = fused.weight_scale_inv.data[blocks : blocks + nb]
        rows, blocks = rows + n, blocks + nb
    return fused


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] of an nn.Linear or FP8Linear, in `dtype`."""
    if isinstance(linear, FP8Linear):
        return linear.dense_weight(dtype)
    return linear.weight.to(dtype)


def to_fp8(model: nn.Module, chosen: Callable[[str], bool], block: tuple[int, int]) -> int:
    """Replaces, in place, each nn.Linear whose parent module's name `chosen` accepts by an
    FP8Linear (on the same device, e.g. meta before loading). Returns how many."""
    targets = [
        (parent, child_name, child)
        for name, parent in model.named_modules()
        if chosen(name)
        for child_name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, child_name, child in targets:
        with torch.device(child.weight.device):
            fp8 = FP8Linear(child.in_features, child.out_features, block)
        setattr(parent, child_name, fp8)
    return len(targets)
