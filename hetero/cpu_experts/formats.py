"""Packed formats of a layer's routed experts, laid out for the CPU kernels.

All experts of one MoE layer share one array per matrix:
- `w13` [E, I, 2, ...]: row r of gate_proj then row r of up_proj, so the thread that owns row r
  computes silu(gate) * up without leaving its rows;
- `w2` [E, H, ...]: down_proj rows.
Per format (K = the input dim of the matrix, G = group size along K):
- bf16: uint16 [.., K] (bf16 bits; numba has no bf16), no scales;
- int8: int8 [.., K], symmetric, fp32 scales [.., K/G] (G = K: one scale per row);
- int4: uint8 [.., K/2], two weights a byte: in each group byte j holds weight j (low nibble) and
  weight j + G/2 (high nibble), both stored + 8; scales bf16 bits (uint16) [.., K/G].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

FORMATS = ("bf16", "int8", "int4")
INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Format:
    name: str  # bf16 | int8 | int4
    group_size: int = 0  # along K; 0 = one scale per row (int8), unused for bf16

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(
                f"unknown CPU expert format {self.name!r} (valid: {', '.join(FORMATS)})"
            )
        if self.name == "int4" and self.group_size not in INT4_GROUPS:
            raise ValueError(f"int4 needs a group size in {INT4_GROUPS}, got {self.group_size}")
        if self.name == "int8" and self.group_size not in (0, 32, 64, 128):
            raise ValueError(
                f"int8 group size must be 0 (per row), 32, 64 or 128, not {self.group_size}"
            )

    @classmethod
    def parse(cls, spec: str) -> Format:
        """'bf16', 'int8' (per row), 'int8-g128', 'int4' (group 32), 'int4-g64' ..."""
        name, _, group = spec.partition("-g")
        default = 32 if name == "int4" else 0
        return cls(name, int(group) if group else default)

    def __str__(self) -> str:
        return self.name + (f"-g{self.group_size}" if self.group_size else "")

    def groups(self, K: int) -> int:
        G = self.group(K)
        if K % G:
            raise ValueError(f"{self}: input dim {K} is not a multiple of the group size {G}")
        return K // G

    def group(self, K: int) -> int:
        return self.group_size or K

    def expert_bytes(self, H: int, I: int) -> int:
        """Bytes of one expert's three matrices (gate and up [I, H], down [H, I]) packed."""
        return 2 * I * self.bytes_per_row(H) + H * self.bytes_per_row(I)

    def bytes_per_row(self, K: int) -> int:
        """Bytes the kernels read for one row of K weights, scales included."""
        if self.name == "bf16":
            return 2 * K
        if self.name == "int8":
            return K + 4 * self.groups(K)
        return K // 2 + 2 * self.groups(K)


@dataclass(frozen=True)
class PackedExperts:
    """One MoE layer's routed experts: E experts, hidden H, intermediate I."""

    fmt: Format
    w13: np.ndarray  # [E, I, 2, K13']
    s13: np.ndarray  # [E, I, 2, H/G] (empty for bf16)
    w2: np.ndarray  # [E, H, K2']
    s2: np.ndarray  # [E, H, I/G]

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]

    @property
    def inter(self) -> int:
        return self.w13.shape[1]

    def expert_bytes(self) -> int:
        """Bytes one expert's three matrices occupy (what one use of it reads)."""
        return self.fmt.expert_bytes(self.hidden, self.inter)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w13": self.w13, "s13": self.s13, "w2": self.w2, "s2": self.s2}


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    """bf16 values -> their uint16 bit patterns (what the kernels read)."""
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_float(bits: np.ndarray) -> torch.Tensor:
    """uint16 bf16 bit patterns -> fp32."""
    return torch.from_numpy(bits.astype(np.int32) << 16).view(torch.float32)


def quantize(w: torch.Tensor, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K] float -> (packed weights, scales) in `fmt`'s layout."""
    if fmt.name == "bf16":
        return bf16_bits(w), np.zeros((*w.shape[:-1], 0), np.float32)
    K = w.shape[-1]
    G = fmt.group(K)
    g = w.float().reshape(*w.shape[:-1], K // G, G)  # [..., K/G, G]
    qmax = 127 if fmt.name == "int8" else 7
    amax = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    if fmt.name == "int8":
        scale = amax / qmax
        q = (g / scale).round().clamp(-qmax - 1, qmax)
    else:
        scale, q = _int4_search(g, amax)
    scale = scale[..., 0]
    if fmt.name == "int8":
        return q.to(torch.int8).reshape(w.shape).numpy(), scale.numpy().astype(np.float32)
    u = (q + 8).to(torch.uint8)  # [..., K/G, G] in 0..15
    packed = u[..., : G // 2] | (u[..., G // 2 :] << 4)  # [..., K/G, G/2]
    return packed.reshape(*w.shape[:-1], K // 2).numpy(), bf16_bits(scale)


def _int4_search(g: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale (as bf16, what the kernels read) among amax/7 x {0.70 .. 1.0} that
    minimizes the squared error: clipping the largest weight a little buys finer steps for the
    rest (about 20% less error than amax/7 on Gaussian weights)."""
    best_err = best_scale = best_q = None
    for c in torch.linspace(0.70, 1.0, 13).tolist():
        scale = bits_to_float(bf16_bits(amax * (c / 7)))
        q = (g / scale).round().clamp(-8, 7)
        err = (g - q * scale).pow(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_q = err, scale, q
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_q = torch.where(better, q, best_q)
    return best_scale, best_q


def dequantize(q: np.ndarray, s: np.ndarray, fmt: Format, K: int) -> torch.Tensor:
    """The simple inverse of `quantize`: fp32 [..., K]."""
    return dequantize_tensors(as_tensor(q), as_tensor(s), fmt, K, torch.float32)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A packed array as a torch tensor without a copy (uint16 bf16 bits become bfloat16).
    A store's arrays are read-only memory maps: torch warns about those, and hetero only reads
    them, so the warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if a.dtype == np.uint16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def dequantize_tensors(
    q: torch.Tensor, s: torch.Tensor, fmt: Format, K: int, dtype: torch.dtype
) -> torch.Tensor:
    """`dequantize` on tensors of any device (e.g. packed experts copied to the GPU) -> [..., K]
    in `dtype`; q and s as `as_tensor` gives them."""
    if fmt.name == "bf16":
        return q.to(dtype)
    G = fmt.group(K)
    lead = q.shape[:-1]
    if fmt.name == "int8":
        w = q.to(dtype).reshape(*lead, K // G, G)
        return (w * s.to(dtype)[..., None]).reshape(*lead, K)
    b = q.reshape(*lead, K // G, G // 2).to(torch.int16)
    w = torch.cat([(b & 15) - 8, (b >> 4) - 8], dim=-1).to(dtype)  # [..., K/G, G]
    return (w * s.to(dtype)[..., None]).reshape(*lead, K)


def pack_experts(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fmt: Format
) -> PackedExperts:
    """gate/up [E, I, H], down [E, H, I] (any float dtype) -> the packed layer."""
    fmt.groups(gate.shape[-1]), fmt.groups(down.shape[-1])  # fail early on a bad group size
    w13, s13 = quantize(torch.stack([gate, up], dim=2), fmt)  # [E, I, 2, H]
    w2, s2 = quantize(down, fmt)
    return PackedExperts(fmt, w13, s13, w2, s2)


def unpack_expert(p: PackedExperts, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's (gate [I, H], up [I, H], down [H, I]) in fp32, as the kernels see them."""
    w13 = dequantize(p.w13[e], p.s13[e], p.fmt, p.hidden)  # [I, 2, H]
    return w13[:, 0], w13[:, 1], dequantize(p.w2[e], p.s2[e], p.fmt, p.inter)
