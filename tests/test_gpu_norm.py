"""The RMSNorm kernel (hetero.gpu.norm) against `RMSNorm.forward`'s torch ops: in Triton's
interpreter without CUDA, at DeepSeek-V3's widths on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hetero.gpu.norm import add_rms_norm, rms_norm  # noqa: E402
from hetero.model.layers import RMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward's torch path, on the CPU."""
    return norm.to("cpu")(x.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [96, 100])  # a power of two's padding masked; not
def test_rms_norm_kernel_equals_torch(dtype, D):
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, 1e-6)
    norm.weight.data = (torch.rand(D, generator=g) + 0.5).to(dtype)
    base = torch.randn(3, 2, D + 8, generator=g).to(dtype) * 4
    x = base[..., :D]  # strided rows, as MLA's latent split off kv_a's output
    want = reference(norm, x)
    got = rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-6)
    assert got.dtype == want.dtype and got.shape == x.shape
    # bf16: one unit in the last place where the two sums of squares round apart
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-2, 1.6e-2)
    torch.testing.assert_close(got.cpu(), want, atol=tol[0], rtol=tol[1])


def test_rms_norm_kernel_refuses_a_weight_of_another_width():
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rms_norm_kernel_at_v3_widths_through_the_module():
    for D in (7168, 1536, 512):
        norm = RMSNorm(D, 1e-6)
        norm.weight.data = torch.rand(D).to(torch.bfloat16) + 0.5
        x = torch.randn(16, D, dtype=torch.bfloat16) * 3
        want = reference(norm, x)
        got = norm.to("cuda")(x.cuda())
        torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_then_norm_in_one_kernel_equals_torch(dtype):
    """add_rms_norm: the residual sum as torch's add rounds it, and RMSNorm of that sum."""
    g = torch.Generator().manual_seed(3)
    D = 100
    norm = RMSNorm(D, 1e-6)
    norm.weight.data = (torch.rand(D, generator=g) + 0.5).to(dtype)
    x, r = (torch.randn(5, D, generator=g).to(dtype) * 4 for _ in range(2))
    s_want, y_want = norm.to("cpu").add(x, r)  # the torch path (CPU tensors)
    s, y = add_rms_norm(x.to(DEVICE), r.to(DEVICE), norm.weight.to(DEVICE), 1e-6)
    assert s.dtype == dtype and y.dtype == dtype
    # fp32: exact; bf16: within an ulp (the interpreter's casts truncate, the GPU's round to
    # nearest even as torch does)
    torch.testing.assert_close(s.cpu(), s_want, rtol=0 if dtype == torch.float32 else 8e-3,
                               atol=0)  # fmt: skip
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (2e-2, 1.6e-2)
    torch.testing.assert_close(y.cpu(), y_want, atol=tol[0], rtol=tol[1])
    with pytest.raises(ValueError, match="do not fit"):
        add_rms_norm(x, r.float() if dtype != torch.float32 else r[:, :50], norm.weight, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_add_then_norm_at_v3_width_rounds_as_torch():
    """On the GPU the sum is torch's bf16 add bit for bit (rounded to nearest even)."""
    g = torch.Generator().manual_seed(7)
    x, r = (torch.randn(16, 7168, generator=g).bfloat16().cuda() * 8 for _ in range(2))
    w = (torch.rand(7168, generator=g) + 0.5).bfloat16().cuda()
    s, y = add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, rms_norm(x + r, w, 1e-6), rtol=0, atol=0)
