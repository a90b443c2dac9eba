"""RMSNorm in one Triton kernel (`RMSNorm.forward`'s torch ops: the reference).

The torch form is four kernels (a cast to fp32, `rms_norm`, a cast back, the weight's product);
DeepSeek-V3 normalizes four times a layer, so at decode those were ~240 launches a step of a
few microseconds each. One program a row: the sum of squares in fp32, the normalized row rounded
to x's dtype (as the reference rounds it), then times the weight, rounded to the output dtype.
`add_rms_norm` also does the residual add before the post-attention norm (one launch fewer a
layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, w_ptr, y_ptr, D, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_rms_norm(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    """s = x + r rounded to x's dtype (as torch's add), y = norm(s) as `_rms_norm`."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + r).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * D + cols, s, mask=ok)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    normed = (s * rstd).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it in one kernel: x, r [..., D] of one dtype ->
    (s = x + r, rms_norm(s)), both contiguous, each rounded as the torch ops round them."""
    D = x.shape[-1]
    if weight.shape != (D,) or r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}, r {tuple(r.shape)} {r.dtype}, weight "
                         f"{tuple(weight.shape)} do not fit")  # fmt: skip
    x2, r2 = x.reshape(-1, D).contiguous(), r.reshape(-1, D).contiguous()
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        BLOCK = triton.next_power_of_2(D)
        _add_rms_norm[(x2.shape[0],)](x2, r2, weight, s, y, D, eps, BLOCK=BLOCK,
                                      num_warps=min(16, max(1, BLOCK // 512)))  # fmt: skip
    return s.view(x.shape), y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (rows may be strided, the last dim contiguous), weight [D] -> [..., D]
    contiguous, in the dtype torch gives weight * x."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit rows of {D}")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        BLOCK = triton.next_power_of_2(D)
        _rms_norm[(x2.shape[0],)](x2, weight, y, D, x2.stride(0), eps, BLOCK=BLOCK,
                                  num_warps=min(16, max(1, BLOCK // 512)))  # fmt: skip
    return y.view(x.shape)
