"""MLA's W_UK / W_UV products from kv_b_proj's FP8 blocks (hetero.gpu.mla_absorb) against the
einsums over the dequantized weight (`MLA.wkv_b`'s rounding): in Triton's interpreter on tiny
shapes without CUDA, at DeepSeek-V3's on the GPU."""

from __future__ import annotations

import pytest
import torch

from hetero.model.fp8 import block_dequantize, block_quantize

pytest.importorskip("triton")
from hetero.gpu.mla_absorb import uk_fp8, uv_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kv_b(H: int, nope: int, v: int, C: int, seed: int, block=(128, 128)):
    g = torch.Generator().manual_seed(seed)
    w, s = block_quantize(torch.randn(H * (nope + v), C, generator=g) * 0.1, block)
    dense = block_dequantize(w, s, block).view(H, nope + v, C)
    return w, s, dense[:, :nope], dense[:, nope:]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (the interpreter's bf16
@pytest.mark.parametrize(  # dots are wrong: bf16 runs on the GPU)
    "T, H, nope, v, C, block",
    [
        (1, 3, 24, 20, 80, (128, 128)),  # one token; heads straddling row blocks; C < 128
        (19, 2, 128, 128, 512, (128, 128)),  # V3's head shape, a partial token tile
        (40, 5, 48, 32, 200, (128, 128)),  # C past one block, partial
        (7, 3, 40, 24, 200, (32, 32)),  # small blocks: several a tile's rows, 32-wide columns
    ],
)
def test_fp8_products_equal_the_dequantized_einsums(T, H, nope, v, C, block, dtype):
    w, s, w_uk, w_uv = kv_b(H, nope, v, C, seed=T, block=block)
    g = torch.Generator().manual_seed(T + 1)
    q = torch.randn(T, H, nope + 16, generator=g)  # q_nope a strided view, as MLA splits it
    q_nope = q.to(dtype).to(DEVICE)[..., :nope]
    want = torch.einsum("thd,hdc->thc", q[..., :nope].to(dtype).float(), w_uk.to(dtype).float())
    got = uk_fp8(q_nope, w.to(DEVICE), s.to(DEVICE), block, nope, v)
    assert got.shape == (T, H, C) and got.dtype == dtype
    close(got, want, dtype)
    lat = torch.randn(H, T, C, generator=g).to(dtype).to(DEVICE).transpose(0, 1)  # head-major
    want = torch.einsum("thc,hdc->thd", lat.cpu().float(), w_uv.to(dtype).float())
    got = uv_fp8(lat, w.to(DEVICE), s.to(DEVICE), block, nope, v)
    assert got.shape == (T, H, v) and got.is_contiguous()
    close(got, want, dtype)


def test_shapes_and_formats_are_checked():
    w, s, _, _ = kv_b(2, 16, 16, 64, seed=0)
    x = torch.zeros(3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit kv_b_proj 64x64 with 2 heads of 16 \\+ 8"):
        uk_fp8(x, w.to(DEVICE), s.to(DEVICE), (128, 128), 16, 8)
    with pytest.raises(ValueError, match="want e4m3fn / float32"):
        uk_fp8(x, w.float().to(DEVICE), s.to(DEVICE), (128, 128), 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 32])
def test_fp8_products_at_v3_shapes_in_bf16(T):
    """V3's kv_b_proj (128 heads of 128 + 128 rows, kv_rank 512), bf16 activations."""
    w, s, w_uk, w_uv = kv_b(128, 128, 128, 512, seed=T)
    q = torch.randn(T, 128, 128, generator=torch.Generator().manual_seed(T)).bfloat16().cuda()
    got = uk_fp8(q, w.cuda(), s.cuda(), (128, 128), 128, 128)
    want = torch.einsum("thd,hdc->thc", q, w_uk.bfloat16().cuda())
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    lat = torch.randn(T, 128, 512, device="cuda").bfloat16()
    got = uv_fp8(lat, w.cuda(), s.cuda(), (128, 128), 128, 128)
    want = torch.einsum("thc,hdc->thd", lat, w_uv.bfloat16().cuda())
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
