"""The rotary kernel (hetero.gpu.rope) against `Rotary.forward`'s torch ops on the same tables:
in Triton's interpreter without CUDA, at DeepSeek-V3's shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hetero.config import ModelConfig  # noqa: E402
from hetero.gpu.rope import rope  # noqa: E402
from hetero.model.layers import Rotary  # noqa: E402
from hetero.testing import tiny_v3_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(rotary: Rotary, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary.forward's torch path, whatever the device."""
    cpu = rotary.to("cpu")
    return cpu(x.cpu(), positions.cpu(), int(positions.max()) + 1).to(x.device)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_torch_rotary(interleave, dtype):
    config = ModelConfig.from_hf(tiny_v3_config(rope_interleave=interleave))
    assert config.rope.interleave == interleave
    rotary = Rotary(config)
    T, h, r = 5, 3, config.qk_rope_head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, h, 16 + r, generator=gen).to(dtype)  # rope part strided, as MLA's q_pe
    x = q[..., 16:].to(DEVICE)
    positions = torch.tensor([0, 7, 3, 40, 1])
    want = reference(rotary, x, positions)
    rotary.to(DEVICE)._cover(41, x.device)
    got = rope(x, positions.to(DEVICE), rotary.cos, rotary.sin, interleave)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (T, h, r)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol, rtol=tol)
    assert not torch.equal(got.float().cpu(), x.float().cpu())  # it rotated something


def test_rope_kernel_refuses_tables_of_another_width():
    x = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        rope(x, torch.zeros(2, dtype=torch.long), torch.zeros(4, 3), torch.zeros(4, 3), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_kernel_at_v3_shapes_through_rotary():
    """Rotary.forward on CUDA (the kernel) against its own torch ops on the CPU: V3's 128
    heads of 64 rope dims and the one shared k_pe head, 16 tokens at scattered positions."""
    from pathlib import Path

    config = ModelConfig.from_hf(Path(__file__).parent / "data" / "models" / "deepseek-v3")
    rotary = Rotary(config)
    positions = torch.randint(0, 40000, (16,))
    for h in (128, 1):
        x = torch.randn(16, h, config.qk_rope_head_dim, dtype=torch.bfloat16)
        want = reference(rotary, x, positions)
        got = rotary.to("cuda")(x.cuda(), positions.cuda(), 40000)
        torch.testing.assert_close(got.float().cpu(), want.float(), atol=1e-2, rtol=1e-2)
