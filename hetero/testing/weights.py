"""Random weights under the published tensor names, and the FP8 block format DeepSeek-V3 ships.

Every tensor draws from its own generator, seeded by (seed, name): the same seed gives the same
bits, and a tensor does not change when the config grows another layer.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from hetero.config import ModelConfig
from hetero.model.fp8 import block_dequantize, block_quantize

# Linears DeepSeek-V3 stores as FP8; embed, lm_head, router, eh_proj and the MTP head stay BF16.
FP8_LINEARS = frozenset(
    {
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
)
ROUTER_GAIN = 2.0  # router logits of std ~2: sigmoid scores well apart, not saturated
HEAD_GAIN = 3.0  # logits of std ~3: a clear argmax that bf16 or FP8 rounding does not flip
CORRECTION_BIAS = 0.1  # e_score_correction_bias ~ U(-0.1, 0.1): large enough to move the top-k


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    parts = name.split(".")
    return len(shape) == 2 and parts[-1] == "weight" and parts[-2] in FP8_LINEARS


def tensor_shapes(config: dict[str, Any], *, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the published layout, in layer order (MTP layers last)."""
    c = ModelConfig.from_hf(config)
    H, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        shapes |= _layer_shapes(c, f"model.layers.{i}.", moe=c.is_moe_layer(i))
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    for i in range(L, L + c.num_nextn_predict_layers if mtp else L):
        p = f"model.layers.{i}."
        shapes[p + "embed_tokens.weight"] = (V, H)
        shapes[p + "enorm.weight"] = (H,)
        shapes[p + "hnorm.weight"] = (H,)
        shapes[p + "eh_proj.weight"] = (H, 2 * H)
        shapes |= _layer_shapes(c, p, moe=True)
        shapes[p + "shared_head.norm.weight"] = (H,)
        shapes[p + "shared_head.head.weight"] = (V, H)
    return shapes


def _layer_shapes(c: ModelConfig, p: str, moe: bool) -> dict[str, tuple[int, ...]]:
    H, nh = c.hidden_size, c.num_attention_heads
    a = p + "self_attn."
    s: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (H,)}
    if c.q_lora_rank:
        s[a + "q_a_proj.weight"] = (c.q_lora_rank, H)
        s[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
        s[a + "q_b_proj.weight"] = (nh * c.qk_head_dim, c.q_lora_rank)
    else:
        s[a + "q_proj.weight"] = (nh * c.qk_head_dim, H)
    s[a + "kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, H)
    s[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
    s[a + "kv_b_proj.weight"] = (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    s[a + "o_proj.weight"] = (H, nh * c.v_head_dim)
    s[p + "post_attention_layernorm.weight"] = (H,)
    if not moe:
        return s | _mlp_shapes(p + "mlp.", H, c.intermediate_size)
    E = c.n_routed_experts
    s[p + "mlp.gate.weight"] = (E, H)
    if c.model_type == "deepseek_v3":
        s[p + "mlp.gate.e_score_correction_bias"] = (E,)
    for e in range(E):
        s |= _mlp_shapes(f"{p}mlp.experts.{e}.", H, c.moe_intermediate_size)
    if c.n_shared_experts:
        I_shared = c.moe_intermediate_size * c.n_shared_experts
        s |= _mlp_shapes(p + "mlp.shared_experts.", H, I_shared)
    return s


def _mlp_shapes(p: str, H: int, I: int) -> dict[str, tuple[int, ...]]:
    return {
        p + "gate_proj.weight": (I, H),
        p + "up_proj.weight": (I, H),
        p + "down_proj.weight": (H, I),
    }


def random_state_dict(
    config: dict[str, Any], *, seed: int = 0, mtp: bool = True
) -> dict[str, torch.Tensor]:
    """fp32 tensors under the published names; scaled so activations and logits stay O(1)."""
    return {
        name: _init(name, shape, seed) for name, shape in tensor_shapes(config, mtp=mtp).items()
    }


def _init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=g) * 2 - 1) * CORRECTION_BIAS
    x = torch.randn(shape, generator=g)
    if len(shape) == 1:  # RMSNorm gains near 1, but not all ones
        return 1 + 0.1 * x
    if name.endswith("embed_tokens.weight"):  # the residual stream starts at rms ~1
        return x
    # Inputs are RMS-normed (rms ~1) or O(1) activations: 1/sqrt(in) keeps outputs O(1).
    gain = 1.0
    if name.endswith("mlp.gate.weight"):
        gain = ROUTER_GAIN
    elif name.endswith(("lm_head.weight", "shared_head.head.weight")):
        gain = HEAD_GAIN
    return x * (gain / math.sqrt(shape[1]))


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """The runtime's own (hetero.model.fp8), for writing FP8 test checkpoints."""
    return block_quantize(w, block)


def fp8_block_dequantize(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """The runtime's own inverse, fp32 [N, K] (tests/test_loader.py checks it block by block)."""
    return block_dequantize(w_fp8, scale_inv, block)
