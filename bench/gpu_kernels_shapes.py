"""The device-free half of bench/gpu_kernels.py: what a run measures (DeepSeek-V3's shapes, read
from its config.json), the FLOP and byte counts each figure is divided by, the JSON record, the
arguments, and the random inputs and torch reference (on whatever device their generator is), so
tests/test_bench_gpu_kernels.py checks all of it on a CPU.

Counts (bf16 activations, 2 bytes; the fewest bytes: each input read once, each output written
once):
- GEMM y[M, N] = x[M, K] W^T: 2 M N K FLOPs; W's bytes (FP8: N K + 4 bytes a 128x128 block scale;
  bf16: 2 N K) + 2 M K + 2 M N.
- MLA decode (absorbed, latent C = 512, rope R = 64, h heads, one new token a sequence): the KV
  read B ctx (C + R) 2 bytes; 2 B h ctx (C + R) FLOPs for the scores + 2 B h ctx C for
  probabilities x latent.
- MLA extend (one sequence, T new tokens after `prefix` cached ones, causal): token i attends
  prefix + i + 1 keys, keys = T prefix + T (T + 1) / 2 (= T ctx_avg with ctx_avg = prefix +
  (T + 1) / 2); 2 keys h (C + R) + 2 keys h C FLOPs; bytes: the context's latent + rope once,
  q_lat + q_pe in, out_lat out.
- fused MoE: 2 pairs 3 H I FLOPs (pairs: (token, slot)s routed to a local expert); bytes: each
  touched local expert's three matrices in its format (scales included) + x in + y out.
- router: 2 T E H FLOPs (the logits matmul); the gate weight (bf16) + x + the [T, k] weights
  (fp32) and ids (int64).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format
from hetero.gpu.fp8_small import MAX_TOKENS as SMALL_MAX
from hetero.model.fp8 import GEMV_MAX_TOKENS, KERNEL_MAX_TOKENS

SECTIONS = ("fp8", "mla", "moe", "router")
V3_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "models" / "deepseek-v3"
PREFILL_MIN_TOKENS = 16  # fp8_gemm_w8a8 from here (fp8_gemm up to KERNEL_MAX_TOKENS: both between)
MOE_FORMATS = ("fp8", "int4-g128", "int4-g32")
GB = 1e9


@dataclass(frozen=True)
class Plan:
    """What one run measures; `budget_ms`: device time per point to spend on repetitions
    (at least 3, at most `max_reps` of each path)."""

    fp8_shapes: tuple[str, ...]
    fp8_tokens: tuple[int, ...]
    mla_batches: tuple[int, ...]
    mla_contexts: tuple[int, ...]
    extend_chunks: tuple[int, ...]
    extend_prefixes: tuple[int, ...]
    moe_formats: tuple[str, ...]
    moe_local: tuple[int, ...]
    moe_tokens: tuple[int, ...]
    router_tokens: tuple[int, ...]
    budget_ms: float
    max_reps: int


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(("q_a", "o", "dense_gate"), (1, 16, 64, 512, 4096), (1, 64), (4096, 32768),
                    (512,), (0, 16384), ("fp8", "int4-g32"), (8, 64), (1, 64, 4096), (1, 4096),
                    budget_ms=40, max_reps=10)  # fmt: skip
    return Plan(tuple(fp8_shapes(v3_config())), tuple(2**i for i in range(13)), (1, 4, 16, 64),
                (1024, 4096, 16384, 32768), (512, 2048), (0, 4096, 16384), MOE_FORMATS,
                (8, 32, 64), (1, 8, 64, 512, 4096), (1, 64, 4096),
                budget_ms=120, max_reps=30)  # fmt: skip


def v3_config() -> ModelConfig:
    return ModelConfig.from_hf(V3_DIR)


def fp8_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """name: (out N, in K) of one layer's FP8 projections."""
    H, nh = c.hidden_size, c.num_attention_heads
    return {
        "q_a": (c.q_lora_rank, H),
        "q_b": (nh * c.qk_head_dim, c.q_lora_rank),
        "kv_a": (c.kv_lora_rank + c.qk_rope_head_dim, H),
        "o": (H, nh * c.v_head_dim),
        "dense_gate": (c.intermediate_size, H),  # up_proj is the same shape
        "dense_down": (H, c.intermediate_size),
        "shared_gate": (c.moe_intermediate_size * c.n_shared_experts, H),
    }


def fp8_kernels(M: int) -> list[str]:
    """hetero's FP8 kernels timed at M tokens: the decode one up to the size FP8Linear uses it
    for, the prefill one from PREFILL_MIN_TOKENS (both where they overlap), the swap-AB one
    for serving's batches past the GEMV (17-64)."""
    names = ["fp8_gemm"] if M <= KERNEL_MAX_TOKENS else []
    names += ["fp8_small"] if GEMV_MAX_TOKENS < M <= SMALL_MAX else []
    return names + (["fp8_gemm_w8a8"] if M >= PREFILL_MIN_TOKENS else [])


def gemm_flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K


def fp8_weight_bytes(N: int, K: int, block: tuple[int, int] = (128, 128)) -> int:
    """e4m3 weight + its fp32 scales, one a block (edge blocks partial)."""
    return N * K + 4 * math.ceil(N / block[0]) * math.ceil(K / block[1])


def gemm_bytes(M: int, N: int, K: int, weight_bytes: int) -> int:
    return weight_bytes + 2 * M * K + 2 * M * N


def mla_decode_bytes(B: int, ctx: int, C: int, R: int) -> int:
    """The latent cache a decode step reads (bf16)."""
    return B * ctx * (C + R) * 2


def mla_decode_flops(B: int, ctx: int, h: int, C: int, R: int) -> int:
    return 2 * B * h * ctx * (C + R) + 2 * B * h * ctx * C


def extend_keys(T: int, prefix: int) -> int:
    """Keys attended by T causal new tokens after `prefix` cached ones, summed over tokens."""
    return T * prefix + T * (T + 1) // 2


def mla_extend_flops(T: int, prefix: int, h: int, C: int, R: int) -> int:
    keys = extend_keys(T, prefix)
    return 2 * keys * h * (C + R) + 2 * keys * h * C


def mla_extend_bytes(T: int, prefix: int, h: int, C: int, R: int) -> int:
    return ((prefix + T) * (C + R) + T * h * (C + R) + T * h * C) * 2


def attention_ref_bytes(scores: int, tokens: int, C: int, R: int) -> int:
    """Rough peak memory of a torch attention reference: the gathered context of `tokens` keys
    (bf16) and ~12 bytes for each of its `scores` (query, head, key) elements (bf16 einsum
    outputs and their sum, the fp32 softmax, bf16 probabilities)."""
    return tokens * (C + R) * 2 + scores * 12


def expert_bytes(fmt: str, H: int, I: int, block: tuple[int, int] = (128, 128)) -> int:
    """One routed expert's three matrices (gate, up [I, H], down [H, I]) in `fmt`: 'fp8'
    (DeepSeek-V3's blocks) or a CPU format such as 'int4-g32' (hetero.cpu_experts.formats)."""
    if fmt == "fp8":
        return 2 * fp8_weight_bytes(I, H, block) + fp8_weight_bytes(H, I, block)
    return Format.parse(fmt).expert_bytes(H, I)


def moe_flops(pairs: int, H: int, I: int) -> int:
    return 2 * pairs * 3 * H * I


def router_bytes(T: int, E: int, H: int, k: int) -> int:
    return 2 * E * H + 2 * T * H + T * k * (4 + 8)


def roofline_ms(flops: float, nbytes: float, limit: dict, fp8: bool = False) -> tuple[float, str]:
    """The floor a path cannot beat on this device: the larger of bytes over the measured copy
    bandwidth and FLOPs over the measured matmul rate (fp8's when `fp8` and it was measured),
    with which of the two it is."""
    mem = nbytes / (limit["hbm_gbps"] * 1e6)
    peak_name = "fp8_tflops" if fp8 and limit.get("fp8_tflops") else "bf16_tflops"
    compute = flops / (limit[peak_name] * 1e9)
    return (mem, "hbm") if mem >= compute else (compute, peak_name.split("_")[0])


def sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def record(
    section: str,
    shape: dict[str, Any],
    kernel: str,
    ms: float,
    baseline: str,
    baseline_ms: float | None,
    flops: float,
    nbytes: float,
    limit: dict,
    env: dict,
    fp8: bool = False,
    **extra: Any,
) -> dict:
    """One JSON line: the kernel's time beside the naive baseline's and the device's limits
    measured in the same run. frac_hbm: GB/s over the copy's; frac_compute: TFLOP/s over the
    matmul's (fp8's for fp8 tensor-core paths when measured); frac_of_limit: the roofline floor
    over the time, the larger of the two."""
    floor, bound = roofline_ms(flops, nbytes, limit, fp8)
    peak = limit["fp8_tflops"] if fp8 and limit.get("fp8_tflops") else limit["bf16_tflops"]
    return {
        "bench": "gpu_kernels",
        "section": section,
        **shape,
        "kernel": kernel,
        "ms": sig(ms),
        "baseline": baseline,
        "baseline_ms": sig(baseline_ms),
        "speedup": sig(baseline_ms / ms) if baseline_ms else None,
        "tflops": sig(flops / ms / 1e9),
        "gbps": sig(nbytes / ms / 1e6),
        "frac_hbm": sig(nbytes / ms / 1e6 / limit["hbm_gbps"], 3),
        "frac_compute": sig(flops / ms / 1e9 / peak, 3),
        "bound": bound,
        "frac_of_limit": sig(floor / ms, 3),
        "limit": limit,
        **extra,
        **env,
    }


def emit(row: dict, out: str | None) -> None:
    """A JSON line to stdout, and appended to `out` if given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def sections(spec: str) -> tuple[str, ...]:
    """'fp8,mla' -> ('fp8', 'mla'); an unknown name is an argparse error naming the valid ones."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(map(repr, bad)) or repr(spec)} "
            f"(valid: {', '.join(SECTIONS)})"
        )
    return names


def parse_args(argv: list[str] | None, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--only",
        type=sections,
        default=SECTIONS,
        help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="a fast subset of every section (~1 min)")
    p.add_argument("--out", help="append the JSON lines to this file as well as stdout")
    p.add_argument("--fp8-tokens", type=lambda v: tuple(int(t) for t in v.split(",")),
                   help="the FP8 section's token counts, e.g. 17,32,64 (default: the "
                   "plan's)")  # fmt: skip
    p.add_argument(
        "--mla-cap-gb",
        type=float,
        default=16.0,
        help="skip MLA decode points whose latent cache exceeds this (GB)",
    )
    p.add_argument(
        "--ref-cap-gb",
        type=float,
        default=20.0,
        help="skip torch attention references that would need more than this (GB)",
    )
    return p.parse_args(argv)  # fmt: skip


# --- inputs and reference (any device: the generator's) -----------------------------------------


def fp8_weight(g: torch.Generator, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight [N, K] e4m3 and its fp32 block scales, W ~ N(0, ~1/K) (no
    quantization pass: fast at V3's sizes)."""
    q = torch.randn(N, K, device=g.device, generator=g).to(torch.float8_e4m3fn)
    s = 0.5 + torch.rand(-(-N // 128), -(-K // 128), device=g.device, generator=g)
    return q, s / K**0.5


def int4_arrays(g: torch.Generator, n: int, H: int, I: int, G: int) -> list[torch.Tensor]:
    """n random experts packed in hetero.cpu_experts.formats' int4 layout (pack_experts is too
    slow at V3's size): w13 [n, I, 2, H/2] and w2 [n, H, I/2] uint8, s13 [n, I, 2, H/G] and
    s2 [n, H, I/G] bf16, scaled so that W ~ N(0, ~1/K) (nibbles - 8 have a std of ~4.6)."""

    def packed(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=g.device, generator=g)

    def scales(*shape: int, K: int) -> torch.Tensor:
        s = 0.5 + torch.rand(*shape, device=g.device, generator=g)
        return (s * 0.2 / K**0.5).to(torch.bfloat16)

    return [packed(n, I, 2, H // 2), scales(n, I, 2, H // G, K=H),
            packed(n, H, I // 2), scales(n, H, I // G, K=I)]  # fmt: skip


def paged(g: torch.Generator, lens: list[int], C: int, R: int, page: int):
    """One layer's pages holding sequences of `lens` tokens in shuffled pages (page 0: padding)
    -> latent [P, page, C], rope [P, page, R] bf16, page table [B, max pages] int32."""
    need = [-(-n // page) for n in lens]
    P = sum(need) + 1
    order = torch.randperm(P - 1, device=g.device, generator=g).int() + 1
    table = torch.zeros(len(lens), max(need), dtype=torch.int32, device=g.device)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = order[at : at + n]
        at += n
    latent, rope = (torch.randn(P, page, d, device=g.device, generator=g) for d in (C, R))
    return latent.bfloat16(), rope.bfloat16(), table


def latent_ref(q_lat, q_pe, latent, rope, table, ctx: int, scale: float) -> torch.Tensor:
    """The model's torch reference for absorbed MLA over pages (`attention._decode_latent`,
    `absorbed_attention`): B sequences of ctx tokens gathered through the table, T new tokens
    each (the last T), scores by einsum, causal softmax in fp32, probabilities x latent.
    q_lat [B, T, h, C], q_pe [B, T, h, R] -> [B, T, h, C]. Decode is T = 1; extend B = 1."""
    T, rows = q_lat.shape[1], table.long()  # [B, pages]
    lat = latent[rows].flatten(1, 2)[:, :ctx].to(q_lat.dtype)  # [B, ctx, C]
    rp = rope[rows].flatten(1, 2)[:, :ctx].to(q_lat.dtype)  # [B, ctx, R]
    scores = torch.einsum("bthc,bsc->bths", q_lat, lat) + torch.einsum("bthr,bsr->bths", q_pe, rp)
    pos = ctx - T + torch.arange(T, device=q_lat.device)  # [T]
    future = torch.arange(ctx, device=q_lat.device)[None, :] > pos[:, None]  # [T, ctx]
    probs = scores.mul(scale).masked_fill(future[None, :, None], float("-inf"))
    probs = probs.softmax(-1, dtype=torch.float32).to(q_lat.dtype)
    return torch.einsum("bths,bsc->bthc", probs, lat)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return sig(((got.float() - want).norm() / want.norm()).item(), 3)
