"""The MoE router after its matmul, fused into one Triton kernel (`Gate.torch_route`: the
reference).

The logits x W^T [T, E] stay a torch matmul (cuBLAS, fp32 as in `Gate`); everything after it —
scores, group selection, top-k, the gather of the weights, normalization and scaling — runs in
one program per token, with the token's E scores held in registers as a [groups, experts a group]
tile (any E and n_group: both sides are padded to powers of two and masked to -inf).

- scores: sigmoid (V3) or softmax over E (V2); `choice` = scores + e_score_correction_bias (V3's
  `noaux_tc`: the bias only chooses, the weights are the unbiased scores).
- group-limited routing: a group's worth is its best choice (V2 `group_limited_greedy`) or the
  sum of its two best (V3); the topk_group best groups are kept, the others' choices set to -inf.
  `Gate` fills V2's dropped groups with 0 instead, which picks the same experts because softmax
  scores are positive and the launcher refuses a k larger than the kept groups hold.
- top-k: k rounds of argmax-and-mask; each round takes the lowest expert id among equal maxima,
  so ids come out in descending choice order, as torch.topk gives them for distinct values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hetero.config import SCORING, TOPK_METHODS, ModelConfig

if TYPE_CHECKING:
    from hetero.model.moe import Gate


@triton.jit
def _route_row(
    logits_ptr,  # this token's [E] fp32
    bias_ptr,  # [E] fp32, read when HAS_BIAS
    weights_ptr,  # this token's [K] fp32 out
    ids_ptr,  # this token's [K] int32 or int64 out
    G,  # groups (1 when routing ignores them)
    EG,  # experts a group
    scale,  # routed_scaling_factor
    K: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP: tl.constexpr,  # 0: no group limit; 1: a group's best choice; 2: its two best
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_EG: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One token's routing from its logits (see the module's doc)."""
    gs, js = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_EG)
    expert = gs[:, None] * EG + js[None, :]  # [BG, BEG] expert id
    ok = (gs[:, None] < G) & (js[None, :] < EG)
    x = tl.load(logits_ptr + expert, mask=ok, other=float("-inf"), cache_modifier=".cg")
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(tl.max(x, 1), 0))
        scores = p / tl.sum(tl.sum(p, 1), 0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + expert, mask=ok, other=0.0)
    choice = tl.where(ok, choice, float("-inf"))
    if GROUP_TOP > 0:
        best = tl.max(choice, 1)  # [BG]
        worth = best
        if GROUP_TOP == 2:  # drop one copy of the best (the first), take the best left
            first = tl.argmax(choice, 1, tie_break_left=True)  # [BG]
            worth += tl.max(tl.where(js[None, :] == first[:, None], float("-inf"), choice), 1)
        worth = tl.where(gs < G, worth, float("-inf"))
        keep = gs < 0  # [BG] all False
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(worth, 0, tie_break_left=True)
            keep = keep | (gs == g)
            worth = tl.where(gs == g, float("-inf"), worth)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    # top-k over the flattened tile: index g * BLOCK_EG + j grows with the expert id g * EG + j,
    # so argmax's leftmost maximum is the lowest expert id among equal choices
    flat = tl.reshape(choice, (BLOCK_G * BLOCK_EG,))
    flat_scores = tl.reshape(scores, (BLOCK_G * BLOCK_EG,))
    idx = tl.arange(0, BLOCK_G * BLOCK_EG)
    ks = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_K,), tl.float32)
    ids = tl.zeros((BLOCK_K,), tl.int32)
    for i in tl.static_range(K):
        j = tl.argmax(flat, 0, tie_break_left=True)
        hit = idx == j
        w = tl.where(ks == i, tl.sum(tl.where(hit, flat_scores, 0.0), 0), w)
        ids = tl.where(ks == i, (j // BLOCK_EG) * EG + j % BLOCK_EG, ids)
        flat = tl.where(hit, float("-inf"), flat)
    if NORM:
        w = w / (tl.sum(w, 0) + 1e-20)
    tl.store(weights_ptr + ks, w * scale, mask=ks < K)
    tl.store(ids_ptr + ks, ids, mask=ks < K)


@triton.jit
def _route(
    logits_ptr,  # [T, E] fp32
    bias_ptr,
    weights_ptr,  # [T, K] fp32
    ids_ptr,  # [T, K] int32 or int64
    G,
    EG,
    scale,
    K: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_EG: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    _route_row(logits_ptr + t * G * EG, bias_ptr, weights_ptr + t * K, ids_ptr + t * K, G, EG,
               scale, K, TOPK_GROUP, GROUP_TOP, SIGMOID, HAS_BIAS, NORM, BLOCK_G, BLOCK_EG,
               BLOCK_K)  # fmt: skip


@triton.jit
def _gemv_route(
    x_ptr,  # [T, H] bf16/fp16, the last dim contiguous
    w_ptr,  # [E, H] the gate's weight, x's dtype, contiguous
    logits_ptr,  # [T, E] fp32 (written here)
    count_ptr,  # [T] int32, zero between calls (the token's last program resets it)
    bias_ptr,
    weights_ptr,  # [T, K] fp32
    ids_ptr,  # [T, K]
    H,
    stride_x,
    G,
    EG,
    scale,
    K: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_EG: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Decode's router in one launch: program (expert block, token) computes BLOCK_E logits of
    its token in fp32 (bf16 products are exact in fp32), stores them, and raises the token's
    counter; the token's last program to finish routes it from all E logits."""
    eb, t = tl.program_id(0), tl.program_id(1).to(tl.int64)
    E = G * EG
    experts = eb * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    e_ok = experts < E
    hs = tl.arange(0, BLOCK_H)
    dots = tl.zeros((BLOCK_E,), tl.float32)
    for h0 in range(0, H, BLOCK_H):  # one pass when BLOCK_H >= H: every load in flight at once
        h = h0 + hs
        x = tl.load(x_ptr + t * stride_x + h, mask=h < H, other=0.0).to(tl.float32)  # [BH]
        w = tl.load(w_ptr + experts[:, None].to(tl.int64) * H + h[None, :],
                    mask=e_ok[:, None] & (h < H)[None, :], other=0.0)  # fmt: skip
        dots += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(logits_ptr + t * E + experts, dots, mask=e_ok)
    tl.debug_barrier()  # every thread's logits stored before the count is raised
    done = tl.atomic_add(count_ptr + t, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        _route_row(logits_ptr + t * E, bias_ptr, weights_ptr + t * K, ids_ptr + t * K, G, EG,
                   scale, K, TOPK_GROUP, GROUP_TOP, SIGMOID, HAS_BIAS, NORM, BLOCK_G, BLOCK_EG,
                   BLOCK_K)  # fmt: skip
        tl.atomic_xchg(count_ptr + t, 0)  # ready for the next call (graph replays)


# `route` takes the one-launch router up to this many tokens. H200 (2026-12-04,
# bench/router_sweep.py, V3's gate cold in L2): 8.3-8.8 us at 1-2 tokens against 10.8 for
# cuBLAS + fused_route, even at 4, 13.5 against 10.8 at 8
GEMV_ROUTE_MAX_TOKENS = 4


@dataclass(frozen=True)
class RouteTiles:
    """gemv_route's launch: experts a program, the most hidden channels a step (a power of two;
    at least V3's 7168, so each program loads its rows in one pass) and warps a program.
    H200 (2026-12-04, router_sweep): one expert x 8192 x 8 warps 8.3-8.8 us a V3 layer at one
    token, two experts 10.2, the first version's four experts x 1024-channel steps 20.4."""

    block_e: int = 1
    max_block_h: int = 8192
    num_warps: int = 8


ROUTE_TILES = RouteTiles()


def _routing(config: ModelConfig, E: int, bias: torch.Tensor | None, device) -> tuple:
    """The routing's launch arguments after checking them: (G, EG, scale, constexprs,
    num_warps) for `_route_row`."""
    c = config
    K, G = c.num_experts_per_tok, c.n_group
    if E != c.n_routed_experts:
        raise ValueError(f"logits have {E} experts, the config {c.n_routed_experts}")
    if c.scoring_func not in SCORING or c.topk_method not in TOPK_METHODS:
        raise ValueError(f"unknown routing {c.scoring_func!r} / {c.topk_method!r}")
    if G < 1 or E % G:
        raise ValueError(f"n_group={G} does not divide n_routed_experts={E}")
    grouped = G > 1 and c.topk_method != "greedy"
    if grouped and not 1 <= c.topk_group <= G:
        raise ValueError(f"topk_group={c.topk_group} is not in 1..n_group={G}")
    kept = c.topk_group * (E // G) if grouped else E
    if not 1 <= K <= kept:
        raise ValueError(f"num_experts_per_tok={K} is not in 1..{kept} (experts in kept groups)")
    if bias is not None:
        if c.topk_method != "noaux_tc":
            raise ValueError(f"a correction bias is only used by noaux_tc, not {c.topk_method!r}")
        if bias.shape != (E,) or bias.dtype != torch.float32 or bias.device != device:
            raise ValueError(f"bias must be [{E}] fp32 on {device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")  # fmt: skip
        if not bias.is_contiguous():
            raise ValueError("bias must be contiguous")
    G = G if grouped else 1
    EG = E // G
    group_top = 0 if not grouped else 2 if c.topk_method == "noaux_tc" and EG >= 2 else 1
    block_g, block_eg = triton.next_power_of_2(G), triton.next_power_of_2(EG)
    constexprs = dict(
        K=K, TOPK_GROUP=c.topk_group if grouped else 0, GROUP_TOP=group_top,
        SIGMOID=c.scoring_func == "sigmoid", HAS_BIAS=bias is not None,
        NORM=bool(c.norm_topk_prob) and K > 1, BLOCK_G=block_g, BLOCK_EG=block_eg,
        BLOCK_K=triton.next_power_of_2(K),
    )  # fmt: skip
    warps = max(1, min(4, block_g * block_eg // 128))
    return G, EG, float(c.routed_scaling_factor), constexprs, warps


def _outputs(T: int, K: int, device, ids_dtype: torch.dtype):
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    weights = torch.empty(T, K, device=device, dtype=torch.float32)
    return weights, torch.empty(T, K, device=device, dtype=ids_dtype)


def fused_route(
    logits: torch.Tensor,
    config: ModelConfig,
    bias: torch.Tensor | None = None,
    ids_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] fp32 (+ V3's e_score_correction_bias [E] fp32) -> (weights [T, k]
    fp32, ids [T, k]), routed as `config` says (scoring_func, topk_method, n_group, topk_group,
    num_experts_per_tok, norm_topk_prob, routed_scaling_factor). ids are int64 by default, as
    `Gate` returns them; int32 on request."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [T, E] fp32, got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
    G, EG, scale, constexprs, warps = _routing(config, E, bias, logits.device)
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous")
    weights, ids = _outputs(T, config.num_experts_per_tok, logits.device, ids_dtype)
    if T:
        _route[(T,)](logits, bias if bias is not None else logits, weights, ids, G, EG, scale,
                     **constexprs, num_warps=warps)  # fmt: skip
    return weights, ids


def gemv_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: ModelConfig,
    bias: torch.Tensor | None,
    counters: torch.Tensor,
    ids_dtype: torch.dtype = torch.int64,
    tiles: RouteTiles = ROUTE_TILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_route(x weight^T in fp32, ...)` in one launch for a few tokens: x [T, H] and the
    gate's weight [E, H] in one 16-bit dtype (their products exact in fp32, summed in fp32, in
    another order than cuBLAS); counters [>= T] int32, zero between calls (kept by the
    caller: `Gate.route_counters`)."""
    T, H = x.shape
    E = weight.shape[0]
    if weight.shape != (E, H) or x.dtype != weight.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} "
                         f"{weight.dtype} do not fit")  # fmt: skip
    if counters.dtype != torch.int32 or counters.numel() < T:
        raise ValueError(f"{counters.numel()} {counters.dtype} counters for {T} tokens")
    G, EG, scale, constexprs, warps = _routing(config, E, bias, x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    weights, ids = _outputs(T, config.num_experts_per_tok, x.device, ids_dtype)
    if T:
        logits = torch.empty(T, E, device=x.device, dtype=torch.float32)
        block_h = min(triton.next_power_of_2(H), tiles.max_block_h)
        _gemv_route[(triton.cdiv(E, tiles.block_e), T)](
            x, weight, logits, counters, bias if bias is not None else logits, weights, ids, H,
            x.stride(0), G, EG, scale, **constexprs, BLOCK_E=tiles.block_e, BLOCK_H=block_h,
            num_warps=tiles.num_warps,
        )  # fmt: skip
    return weights, ids


def route(gate: Gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gate(x)` for x [T, H] -> (weights [T, k] fp32, ids [T, k] int64): the logits as
    `Gate` computes them (fp32 products of the weight's values), the rest by `fused_route`.

    A bf16/fp16 weight and x of its dtype are multiplied as they are (products of two bf16
    values are exact in fp32): up to GEMV_ROUTE_MAX_TOKENS tokens all in one launch
    (`gemv_route`), more through cuBLAS into fp32 (`out_dtype`), never copying the [E, H]
    weight to fp32 at each call (~8 us a layer on the H200, a third of the router's time)."""
    w, bias = gate.weight, getattr(gate, "e_score_correction_bias", None)
    sixteen = x.is_cuda and x.dtype == w.dtype and w.dtype in (torch.bfloat16, torch.float16)
    if sixteen and x.shape[0] <= GEMV_ROUTE_MAX_TOKENS:
        counters = gate.route_counters(x.device, GEMV_ROUTE_MAX_TOKENS)
        return gemv_route(x, w, gate.config, bias, counters)
    if sixteen:
        logits = torch.mm(x, w.t(), out_dtype=torch.float32)  # [T, E]
    else:
        logits = F.linear(x.float(), w.float())  # [T, E]
    return fused_route(logits, gate.config, bias)
