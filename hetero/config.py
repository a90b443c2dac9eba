"""Model configuration, read once from an HF `config.json` (DeepSeek-V2/V2-Lite, V3/R1, Moonlight).

Every difference between the families is settled here, so the model code branches on fields, never
on `model_type` or on sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
)
SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class ConfigError(ValueError):
    """A config.json that hetero cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    interleave: bool = True  # pairs (x0, x1), (x2, x3)... as DeepSeek's weights expect

    @property
    def attention_factor(self) -> float:
        """YaRN's scale on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
        if self.type != "yarn":
            return 1.0
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int  # 0: no q LoRA (V2-Lite, Moonlight): q_proj maps hidden -> heads directly
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    fp8_block: tuple[int, int] | None = None  # DeepSeek-V3 FP8: weight_scale_inv per block
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            scale *= yarn_mscale(self.rope.factor, self.rope.mscale_all_dim) ** 2
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def layer_param_counts(self) -> tuple[int, int, int]:
        """(attention + norms, dense MLP or shared + router, routed experts) of one MoE layer."""
        H, nh = self.hidden_size, self.num_attention_heads
        q = H * nh * self.qk_head_dim
        if self.q_lora_rank:
            q = H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        kv = H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + nh * self.v_head_dim * H + 2 * H
        E = self.n_routed_experts
        shared = 3 * H * self.moe_intermediate_size * self.n_shared_experts + E * H + E
        return attn, shared, 3 * H * self.moe_intermediate_size * E

    @property
    def num_parameters(self) -> int:
        """All weights the model runs (the MTP layer excluded)."""
        return self._count(activated=False)

    @property
    def num_activated_parameters(self) -> int:
        """Weights one token touches: everything but the routed experts it was not sent to."""
        return self._count(activated=True)

    def _count(self, activated: bool) -> int:
        H, V = self.hidden_size, self.vocab_size
        attn, shared, routed = self.layer_param_counts()
        if activated:
            routed = routed * self.num_experts_per_tok // self.n_routed_experts
        n_moe = len(self.moe_layers)
        n_dense = self.num_hidden_layers - n_moe
        total = n_moe * (attn + shared + routed) + n_dense * (attn + 3 * H * self.intermediate_size)
        return total + V * H * (1 if self.tie_word_embeddings else 2) + H

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any], name: str = "config.json") -> ModelConfig:
        """Reads a checkpoint directory, a config.json path, or an already parsed dict."""
        if not isinstance(source, dict):
            path = Path(source)
            path = path if path.suffix == ".json" else path / "config.json"
            name = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{name}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}: not valid JSON ({e})") from None
        return _parse(source, name)


def _parse(d: dict[str, Any], name: str) -> ModelConfig:
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{name}: {msg}")

    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail(
            f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for key in REQUIRED_FIELDS:
        if d.get(key) is None:
            raise fail(f"missing field {key!r}, required for {model_type}")
    if d.get("hidden_act", "silu") != "silu":
        raise fail(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("attention_bias"):
        raise fail("attention_bias=true is not supported by DeepSeek MLA")
    is_v3 = model_type == "deepseek_v3"
    scoring = d.get("scoring_func", "sigmoid" if is_v3 else "softmax")
    topk_method = d.get("topk_method", "noaux_tc" if is_v3 else "greedy")
    if scoring not in SCORING:
        raise fail(f"scoring_func {scoring!r} is not one of {SCORING}")
    if topk_method not in TOPK_METHODS:
        raise fail(f"topk_method {topk_method!r} is not one of {TOPK_METHODS}")
    n_group, topk_group = d.get("n_group") or 1, d.get("topk_group") or 1
    if d["n_routed_experts"] % n_group or topk_group > n_group:
        raise fail(
            f"n_group={n_group}, topk_group={topk_group} do not divide "
            f"n_routed_experts={d['n_routed_experts']}"
        )
    quant = d.get("quantization_config")
    fp8_block = None
    if quant is not None:
        if quant.get("quant_method") != "fp8":
            raise fail(
                f"quantization_config.quant_method {quant.get('quant_method')!r} is not supported"
            )
        fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
    eos = d.get("eos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d["moe_intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        q_lora_rank=d.get("q_lora_rank") or 0,
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"],
        n_routed_experts=d["n_routed_experts"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"],
        first_k_dense_replace=d.get("first_k_dense_replace") or 0,
        moe_layer_freq=d.get("moe_layer_freq") or 1,
        scoring_func=scoring,
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_parse_rope(d, is_v3, fail),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        fp8_block=fp8_block,
        num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def _parse_rope(d: dict[str, Any], is_v3: bool, fail) -> RopeConfig:
    """Both spellings: `rope_scaling` + top-level `rope_theta` (published checkpoints) and
    `rope_parameters` with `rope_type`/`rope_theta` inside (files written by transformers 5)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    # V2 code always rotates interleaved pairs; V3 files may say otherwise.
    interleave = bool(d.get("rope_interleave", True)) if is_v3 else True
    if kind == "default":
        return RopeConfig(theta=float(theta), interleave=interleave)
    if kind != "yarn":
        raise fail(f"rope type {kind!r} is not supported (only 'default' and 'yarn')")
    for key in ("factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            raise fail(f"missing field 'rope_scaling.{key}', required for YaRN")
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(params["factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
        interleave=interleave,
    )
