"""Tiny HF `config.json` dicts in the published DeepSeek-V3 and V2-Lite spelling.

Sizes are small but not round: hidden 192 leaves partial 64-wide FP8 edge blocks, so every code
path that assumes `hidden % 128 == 0` meets a counter-example.
"""

from __future__ import annotations

from typing import Any

from hetero.config import ModelConfig
from hetero.testing.tokenizer import BOS_ID, EOS_ID

TINY_VOCAB = 1024


def _common() -> dict[str, Any]:
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 192,
        "initializer_range": 0.02,
        "intermediate_size": 320,
        "kv_lora_rank": 64,
        "max_position_embeddings": 512,
        "moe_intermediate_size": 96,
        "moe_layer_freq": 1,
        "n_routed_experts": 16,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "pretraining_tp": 1,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "seq_aux": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": TINY_VOCAB,
    }


def _finish(config: dict[str, Any], overrides: dict[str, Any], name: str) -> dict[str, Any]:
    config.update(overrides)
    # Published files repeat the head count as num_key_value_heads; keep them in step.
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    ModelConfig.from_hf(config, name=name)  # raises ConfigError on a bad override
    return dict(sorted(config.items()))


def fp8_quantization_config() -> dict[str, Any]:
    """DeepSeek-V3's: e4m3 weights, one fp32 scale per 128x128 block, activations at run time."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }


def tiny_v3_config(**overrides: Any) -> dict[str, Any]:
    """DeepSeek-V3 in miniature: q LoRA, sigmoid + noaux_tc group routing, FP8, one MTP layer."""
    config = _common() | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "ep_size": 1,
        "q_lora_rank": 96,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 1,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 128,
            "type": "yarn",
        },
        "quantization_config": fp8_quantization_config(),
    }
    return _finish(config, overrides, "tiny_v3_config")


def tiny_v2_config(**overrides: Any) -> dict[str, Any]:
    """DeepSeek-V2-Lite in miniature: no q LoRA, softmax greedy routing, BF16, no MTP."""
    config = _common() | {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 128,
            "type": "yarn",
        },
    }
    return _finish(config, overrides, "tiny_v2_config")
