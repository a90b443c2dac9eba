from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter (tiny shapes)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the EngineHandle tests' fixtures (`demo`, `make_handle`; a module's own `demo` overrides it)
pytest_plugins = ["handle_support"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    from hetero.testing import write_tiny_v3

    return write_tiny_v3(tmp_path_factory.mktemp("tiny-v3"))


@pytest.fixture(scope="session")
def tiny_v3_aligned(tmp_path_factory):
    """FP8 without partial edge blocks, so transformers' own FP8 dequantization can load it."""
    from hetero.testing import write_tiny_v3

    sizes = {"hidden_size": 256, "num_attention_heads": 8, "intermediate_size": 384}
    return write_tiny_v3(tmp_path_factory.mktemp("tiny-v3-aligned"), seed=3, **sizes)


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    from hetero.testing import write_tiny_v2

    return write_tiny_v2(tmp_path_factory.mktemp("tiny-v2"))


@pytest.fixture(scope="session")
def hf_v3(tmp_path_factory):
    """A checkpoint written by transformers' own DeepseekV3ForCausalLM.save_pretrained."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        moe_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=12,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=24,
        qk_nope_head_dim=24,
        n_group=3,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        initializer_range=0.1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.8,
            "mscale_all_dim": 0.6,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("hf-v3")
    model.save_pretrained(path)
    return path
