"""Small building blocks: RMSNorm, the SwiGLU MLP, and rotary embeddings (YaRN-capable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    """Normalizes in fp32 whatever the model dtype, as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton kernel for the four ops below (hetero.gpu.norm)
            from hetero.gpu.norm import rms_norm  # triton: imported where it runs

            return rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, self(x + r)): a residual add and this norm after it, on CUDA one kernel."""
        if x.is_cuda and r.dtype == x.dtype:
            from hetero.gpu.norm import add_rms_norm

            return add_rms_norm(x, r, self.weight, self.eps)
        s = x + r
        return s, self(s)


def Linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). Dense layers, shared experts and each routed expert."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim)
        self.up_proj = Linear(dim, inter_dim)
        self.down_proj = Linear(inter_dim, dim)
        self.gate_up: nn.Module | None = None  # `fuse()`: gate and up as one FP8 matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            return self.down_proj(self.gate_up.silu_mul(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse(self) -> None:
        """gate and up as one FP8 matrix where they fuse (hetero.model.fp8.fuse_fp8)."""
        from hetero.model.fp8 import fuse_fp8

        self.__dict__["gate_up"] = fuse_fp8([self.gate_proj, self.up_proj])  # see fuse_fp8


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2]; YaRN blends interpolated and extrapolated ones by a ramp."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.type != "yarn":
        return inv_freq

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the dimension keeps its original frequency
    return inv_freq / rope.factor * (1 - extrapolate) + inv_freq * extrapolate


class Rotary(nn.Module):
    """cos/sin tables [max_len, rope_dim/2], already multiplied by YaRN's attention factor."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rope = config.rope
        self.dim = config.qk_rope_head_dim
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def tables(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`needed`: a bound on max(positions) + 1 known on the host (the batch's longest
        context), so that no step waits for the GPU to read positions back."""
        self._cover(needed, positions.device)
        return self.cos[positions], self.sin[positions]  # [T, rope_dim/2] each

    def full_tables(self, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables [L >= needed, rope_dim/2] fp32 (for kernels that index them)."""
        self._cover(needed, device)
        return self.cos, self.sin

    def _cover(self, needed: int, device: torch.device) -> None:
        if needed > self.cos.shape[0]:
            self._extend(max(needed, 2 * self.cos.shape[0], 256), device)

    def _extend(self, length: int, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.rope, self.dim).to(device)
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        self.cos = freqs.cos() * self.rope.attention_factor
        self.sin = freqs.sin() * self.rope.attention_factor

    def forward(self, x: torch.Tensor, positions: torch.Tensor, needed: int) -> torch.Tensor:
        """x [T, heads, rope_dim] rotated at its tokens' positions [T]; same layout out. On the
        GPU one Triton kernel (hetero.gpu.rope) does what the torch ops below do."""
        if x.is_cuda:
            from hetero.gpu.rope import rope  # triton: imported where it runs

            self._cover(needed, x.device)
            return rope(x, positions, self.cos, self.sin, self.rope.interleave)
        cos, sin = self.tables(positions, needed)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, rope_dim/2]
        xf = x.float()
        if self.rope.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
