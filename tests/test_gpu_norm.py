"""The RMSNorm kernel (hetero.gpu.norm) against `RMSNorm.forward`'s torch ops: in Triton's
interpreter without CUDA, at DeepSeek-V3's widths on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hetero.gpu.norm import rms_norm  # noqa: E402
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
