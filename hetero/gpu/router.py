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

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hetero.config import SCORING, TOPK_METHODS, ModelConfig

if TYPE_CHECKING:
    from hetero.model.moe import Gate


@triton.jit
def _route(
    logits_ptr,  # [T, E] fp32
    bias_ptr,  # [E] fp32, read when HAS_BIAS
    weights_ptr,  # [T, K] fp32
    ids_ptr,  # [T, K] int32 or int64
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
    t = tl.program_id(0).to(tl.int64)
    E = G * EG
    gs, js = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_EG)
    expert = gs[:, None] * EG + js[None, :]  # [BG, BEG] expert id
    ok = (gs[:, None] < G) & (js[None, :] < EG)
    x = tl.load(logits_ptr + t * E + expert, mask=ok, other=float("-inf"))
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
            first = tl.min(tl.where(choice == best[:, None], js[None, :], BLOCK_EG), 1)
            worth += tl.max(tl.where(js[None, :] == first[:, None], float("-inf"), choice), 1)
        worth = tl.where(gs < G, worth, float("-inf"))
        keep = gs < 0  # [BG] all False
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.min(tl.where(worth == tl.max(worth, 0), gs, BLOCK_G), 0)
            keep = keep | (gs == g)
            worth = tl.where(gs == g, float("-inf"), worth)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    ks = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_K,), tl.float32)
    ids = tl.zeros((BLOCK_K,), tl.int32)
    for i in tl.static_range(K):
        e = tl.min(tl.min(tl.where(choice == tl.max(tl.max(choice, 1), 0), expert, E), 1), 0)
        hit = expert == e
        w = tl.where(ks == i, tl.sum(tl.sum(tl.where(hit, scores, 0.0), 1), 0), w)
        ids = tl.where(ks == i, e, ids)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        w = w / (tl.sum(w, 0) + 1e-20)
    tl.store(weights_ptr + t * K + ks, w * scale, mask=ks < K)
    tl.store(ids_ptr + t * K + ks, ids, mask=ks < K)


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
    c = config
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [T, E] fp32, got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
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
        if bias.shape != (E,) or bias.dtype != torch.float32 or bias.device != logits.device:
            raise ValueError(f"bias must be [{E}] fp32 on {logits.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")  # fmt: skip
        if not bias.is_contiguous():
            raise ValueError("bias must be contiguous")
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous")
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    weights = torch.empty(T, K, device=logits.device, dtype=torch.float32)
    ids = torch.empty(T, K, device=logits.device, dtype=ids_dtype)
    if T == 0:
        return weights, ids
    if not grouped:
        G = 1
    EG = E // G
    group_top = 0 if not grouped else 2 if c.topk_method == "noaux_tc" and EG >= 2 else 1
    block_g, block_eg = triton.next_power_of_2(G), triton.next_power_of_2(EG)
    _route[(T,)](
        logits, bias if bias is not None else logits, weights, ids, G, EG,
        float(c.routed_scaling_factor), K=K, TOPK_GROUP=c.topk_group if grouped else 0,
        GROUP_TOP=group_top, SIGMOID=c.scoring_func == "sigmoid", HAS_BIAS=bias is not None,
        NORM=bool(c.norm_topk_prob) and K > 1, BLOCK_G=block_g, BLOCK_EG=block_eg,
        BLOCK_K=triton.next_power_of_2(K), num_warps=max(1, min(4, block_g * block_eg // 128)),
    )  # fmt: skip
    return weights, ids


def route(gate: Gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gate(x)` for x [T, H]: the logits by a torch matmul in fp32, as `Gate` computes them,
    the rest by `fused_route` -> (weights [T, k] fp32, ids [T, k] int64).

    A bf16/fp16 weight and x of the same dtype are multiplied as they are, into fp32
    (`out_dtype`: cuBLAS accumulates in fp32, and products of two bf16 values are exact in fp32,
    so the logits are `Gate`'s up to the order of the sums) instead of copying the [E, H] weight
    to fp32 at every call (~8 us a layer on the H200, a third of the router's time)."""
    w = gate.weight
    if x.is_cuda and x.dtype == w.dtype and w.dtype in (torch.bfloat16, torch.float16):
        logits = torch.mm(x, w.t(), out_dtype=torch.float32)  # [T, E]
    else:
        logits = F.linear(x.float(), w.float())  # [T, E]
    return fused_route(logits, gate.config, getattr(gate, "e_score_correction_bias", None))
