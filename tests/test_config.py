from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hetero.config import ConfigError, ModelConfig, yarn_mscale

MODELS = Path(__file__).parent / "data" / "models"  # copies of ../shared/models (published configs)


def test_deepseek_v3_parses_and_counts_671b():
    c = ModelConfig.from_hf(MODELS / "deepseek-v3")
    assert (c.model_type, c.q_lora_rank, c.kv_lora_rank, c.n_group, c.topk_group) == (
        "deepseek_v3",
        1536,
        512,
        8,
        4,
    )
    assert (c.scoring_func, c.topk_method, c.fp8_block) == ("sigmoid", "noaux_tc", (128, 128))
    assert c.rope.type == "yarn" and c.rope.factor == 40 and c.rope.interleave
    assert c.moe_layers == tuple(range(3, 61))
    # DeepSeek-V3's report: 671B parameters (MTP excluded), 37B activated per token.
    assert c.num_parameters == pytest.approx(671e9, rel=0.005)
    assert c.num_activated_parameters == pytest.approx(37e9, rel=0.03)
    # YaRN with mscale == mscale_all_dim: cos/sin unscaled, the softmax scale carries it squared.
    assert c.rope.attention_factor == 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2)


def test_deepseek_v2_lite_parses():
    c = ModelConfig.from_hf(MODELS / "deepseek-v2-lite" / "config.json")
    assert c.q_lora_rank == 0 and c.scoring_func == "softmax" and c.topk_method == "greedy"
    assert not c.norm_topk_prob and c.n_shared_experts == 2 and c.moe_layers == tuple(range(1, 27))
    assert c.rope.mscale == c.rope.mscale_all_dim == pytest.approx(0.707)
    assert c.num_parameters == pytest.approx(15.7e9, rel=0.01)


def test_moonlight_parses():
    c = ModelConfig.from_hf(MODELS / "moonlight")
    assert c.model_type == "deepseek_v3" and c.q_lora_rank == 0 and c.n_group == 1
    assert c.rope.type == "default" and c.rope.theta == 50000.0 and c.fp8_block is None
    assert c.routed_scaling_factor == pytest.approx(2.446)
    assert c.num_parameters == pytest.approx(16e9, rel=0.01)


def test_rope_parameters_spelling_equals_rope_scaling():
    d = json.loads((MODELS / "deepseek-v3" / "config.json").read_text())
    published = ModelConfig.from_hf(d)
    written = dict(d)
    rope = dict(written.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = written.pop("rope_theta")
    written["rope_parameters"] = rope
    written["rope_interleave"] = True
    assert ModelConfig.from_hf(written) == published
    written["rope_interleave"] = False
    assert not ModelConfig.from_hf(written).rope.interleave


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"kv_lora_rank": None}, "missing field 'kv_lora_rank'"),
        ({"scoring_func": "relu"}, "scoring_func 'relu'"),
        ({"n_group": 3}, "n_group=3"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4}},
            "rope_scaling.original_max_position_embeddings",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 4}}, "rope type 'dynamic'"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, change, message):
    d = json.loads((MODELS / "deepseek-v3" / "config.json").read_text())
    d.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(tmp_path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_yarn_mscale():
    assert yarn_mscale(1.0, 1.0) == 1.0
    assert yarn_mscale(40, 0.707) == pytest.approx(0.1 * 0.707 * 3.6888794541139363 + 1)
