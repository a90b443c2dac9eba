"""y = x W^T at prefill sizes (M >= 64 tokens) with W in DeepSeek-V3's FP8 blocks, on FP8 tensor
cores: the activations are quantized on the fly to float8_e4m3fn with one scale per token per
128 channels (`quantize_act`, DeepSeek-V3's act_quant), then each 128-wide K block is one FP8
dot whose fp32 result is scaled by the token's and the weight block's scales:
    y[m, n] = sum_kb xs[m, kb] * ws[n // 128, kb] * sum_{k in kb} xq[m, k] Wq[n, k].
The weight is never dequantized (the decode kernel, fp8_gemm.py, reads it as stored too but
multiplies in tf32 against unquantized activations: right for a few tokens, not for thousands).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)
FP8_MAX = 448.0  # largest float8_e4m3fn


@triton.jit
def _quantize_act(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, stride_sk,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """One program a (ROWS tokens, 128-channel block) tile: q = x / s in e4m3, s = amax / 448
    a row (one program a token and block made 230K programs of 128 values at a 4096 x 7168
    prefill: too little in flight to stream HBM); s [M, K/BLOCK] at any strides."""
    mb, kb = tl.program_id(0), tl.program_id(1)
    m = mb * ROWS + tl.arange(0, ROWS)  # [ROWS]
    k = kb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = (m[:, None] < M) & (k[None, :] < K)
    rows = m.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_xm + k[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.max(tl.abs(x), axis=1) / 448.0  # [ROWS]
    s = tl.where(s > 0, s, 1.0)
    tl.store(q_ptr + rows * K + k[None, :], (x / s[:, None]).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * stride_sm + kb * stride_sk, s, mask=m < M)


@triton.jit
def _fp8_gemm_w8a8(
    xq_ptr,  # [M, K] e4m3
    xs_ptr,  # [M, K/BK] fp32
    w_ptr,  # [N, K] e4m3
    ws_ptr,  # [ceil(N/SN), ceil(K/BK)] fp32
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_ws,
    SN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.arange(0, BLOCK_K)
    tok_ok, row_ok = toks < M, rows < N
    kbs = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kbs):
        k = kb * BLOCK_K + cols
        x = tl.load(xq_ptr + toks[:, None] * K + k[None, :],
                    mask=tok_ok[:, None] & (k[None, :] < K), other=0.0)  # [BM, BK]  # fmt: skip
        w = tl.load(w_ptr + rows[:, None] * K + k[None, :],
                    mask=row_ok[:, None] & (k[None, :] < K), other=0.0)  # [BN, BK]  # fmt: skip
        xs = tl.load(xs_ptr + toks * kbs + kb, mask=tok_ok, other=0.0)  # [BM]
        ws = tl.load(ws_ptr + (rows // SN) * stride_ws + kb, mask=row_ok, other=0.0)  # [BN]
        part = tl.dot(x, tl.trans(w), out_dtype=tl.float32)  # fp8 x fp8 -> fp32
        acc += part * xs[:, None] * ws[None, :]
    tl.store(y_ptr + toks[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & row_ok[None, :])  # fmt: skip


def quantize_act(
    x: torch.Tensor, block: int = 128, token_minor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/block)]), a scale per token per block.
    `token_minor`: the scales stored block by block (s.t() contiguous), the layout cuBLAS's
    block-scaled GEMM wants: written so by the kernel, not copied after it."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    kbs = triton.cdiv(K, block)
    if token_minor:
        s = torch.empty(kbs, M, device=x.device, dtype=torch.float32).t()
    else:
        s = torch.empty(M, kbs, device=x.device, dtype=torch.float32)
    if M:
        rows = min(16, triton.next_power_of_2(M))
        grid = (triton.cdiv(M, rows), kbs)
        _quantize_act[grid](x, q, s, M, K, x.stride(0), s.stride(0), s.stride(1), BLOCK=block,
                            ROWS=rows)  # fmt: skip
    return q, s


def fp8_gemm_w8a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    block_m: int = 64,
    block_n: int = 128,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, scale [ceil(N/bn),
    ceil(K/bk)] fp32 -> y [..., N] in x's dtype, activations quantized per token per bk."""
    N, K = weight.shape
    bn, bk = block
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        raise ValueError(f"weight {weight.dtype} / scale {scale.dtype}: want e4m3fn / float32")
    if scale.shape != (triton.cdiv(N, bn), triton.cdiv(K, bk)):
        raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {N}x{K} in {block}")
    if bk & (bk - 1) or bk < 16:
        raise ValueError(f"block {block}: its K size must be a power of two >= 16")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    xq, xs = quantize_act(x2, bk)
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M:
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _fp8_gemm_w8a8[grid](
            xq, xs, weight, scale, y, M, N, K, scale.stride(0),
            SN=bn, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk,
        )  # fmt: skip
    return y.view(*lead, N)


def scaled_mm_w8a8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor | None:
    """`fp8_gemm_w8a8`'s product through cuBLAS's block-scaled FP8 GEMM (torch._scaled_mm with
    1x128 activation and 128x128 weight scales, Hopper and later), on the same quantized
    activations: 1.3-1.9x the Triton kernel on the H200 at V3's prefill shapes (2026-12-03).
    None where this torch, cuBLAS or shape does not support it (the caller falls back)."""
    if block != (128, 128) or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M % 4:  # cuBLAS wants the activation scales' rows in multiples of 4
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, -M % 4))
    xq, xs = quantize_act(x2, token_minor=True)  # scales [M, K/128], outer-dim-major
    try:
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=x.dtype)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None
    return y[:M].view(*lead, weight.shape[0])


def flashinfer_w8a8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor | None:
    """`fp8_gemm_w8a8`'s product through flashinfer's SM90 block-scaled FP8 GEMM
    (`flashinfer.gemm.fp8_blockscale_gemm_sm90`, flashinfer >= 0.6: TensorRT-LLM's kernel after
    DeepGEMM's design, built by nvcc on first use). It quantizes x per token per 128 channels
    itself, as `quantize_act` does, and reads the weight's 128x128 scales as stored. None
    where flashinfer lacks it, the GPU is not a Hopper or the shape does not fit it (x bf16,
    K a multiple of 128, N of 64): the caller falls back."""
    N, K = weight.shape
    if block != (128, 128) or x.dtype != torch.bfloat16 or K % 128 or N % 64 or not x.is_cuda:
        return None
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return None
    try:
        from flashinfer.gemm import fp8_blockscale_gemm_sm90
    except ImportError:  # no flashinfer, or one before 0.6
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    try:
        y = fp8_blockscale_gemm_sm90(x2, weight, None, scale, out_dtype=x.dtype)
    except (RuntimeError, ValueError) as e:
        log.warning("flashinfer's block-scaled FP8 GEMM refused %dx%d (%s): cuBLAS's instead",
                    N, K, str(e).split("\n")[0][:200])  # fmt: skip
        return None
    return y.view(*lead, N)


# FP8Linear's GEMMs past the decode kernels' rows by name (hetero.model.fp8.PREFILL_GEMMS: the
# order they are tried in): each returns None where it does not apply; "triton" always does
ROUTES: dict[str, Callable[..., torch.Tensor | None]] = {
    "flashinfer": flashinfer_w8a8,
    "cublas": scaled_mm_w8a8,
    "triton": fp8_gemm_w8a8,
}
