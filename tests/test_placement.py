"""Placement YAML: shipped configs, rule semantics, and errors that name file, line and key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hetero.config import ModelConfig
from hetero.placement import (
    ExpertPlacement,
    PlacementError,
    RuntimeSettings,
    default_placement,
    load_placement,
    parse_placement,
    read_profile,
)
from hetero.testing import tiny_v2_config, tiny_v3_config

ROOT = Path(__file__).parent.parent
MODELS = Path(__file__).parent / "data" / "models"
GIB = 1 << 30


def model(name: str) -> ModelConfig:
    if name == "tiny-v3":
        return ModelConfig.from_hf(tiny_v3_config())
    if name == "tiny-v2":
        return ModelConfig.from_hf(tiny_v2_config())
    return ModelConfig.from_hf(MODELS / name)


TINY = model("tiny-v3")  # 3 layers (0 dense, 1-2 MoE), 16 experts top-4, H 192, moe I 96
SHIPPED = {
    "deepseek-v3-24gb.yaml": ["deepseek-v3"],
    "deepseek-v3-48gb.yaml": ["deepseek-v3"],
    "deepseek-v3-80gb.yaml": ["deepseek-v3"],
    "deepseek-v2-lite.yaml": ["deepseek-v2-lite"],
    "moonlight.yaml": ["moonlight"],
    "tiny.yaml": ["tiny-v3", "tiny-v2"],
    "demo.yaml": ["tiny-v3", "tiny-v2"],
}


def test_every_shipped_config_is_tested():
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("file,name", [(f, m) for f, models in SHIPPED.items() for m in models])
def test_shipped_config_loads_and_fits(file, name):
    """Each shipped placement loads against its model and fits the GPU it is named for (24 GiB
    otherwise), with a host of 1 TiB."""
    from hetero.plan import GIB, plan_memory

    config = model(name)
    p = load_placement(ROOT / "configs" / file, config)
    m = re.search(r"(\d+)gb", file)
    vram = int(m.group(1)) if m else 24
    plan = plan_memory(config, p, vram * GIB, 1024 * GIB)
    assert plan.fits, plan.reasons
    # the serving engine's KV pool: whole pages, their tokens and bytes in the table
    ps = p.runtime.kv_page_size
    assert plan.kv_pages > 0 and plan.kv_tokens == plan.kv_pages * ps
    kv = plan.row("KV cache")
    assert kv.gpu_bytes == plan.kv_tokens * plan.kv_bytes_per_token
    assert f"{plan.kv_pages} pages x {ps} tok" in kv.detail


def test_v3_configs():
    config = model("deepseek-v3")
    p24, p48, p80 = (
        load_placement(ROOT / "configs" / f"deepseek-v3-{gb}gb.yaml", config) for gb in (24, 48, 80)
    )
    assert p24.experts(3) == ExpertPlacement("int4", (), "fp8", 2)
    assert p24.module("model.layers.0.mlp") == ("gpu", "fp8")
    assert p24.module("model.layers.60.mlp.experts") == ("cpu", "int4")
    assert p24.module("lm_head") == ("gpu", "bf16")  # never fp8, whatever the rule says
    assert p24.module("model.layers.5.mlp.gate") == ("gpu", "bf16")
    assert p24.runtime.kv_cache_tokens == 32768
    assert p48.experts(60) == ExpertPlacement("int4", tuple(range(8)), "fp8", 1)
    assert p48.runtime == RuntimeSettings(kv_cache_tokens=65536, staging_gb=0.5)  # inherited
    assert p80.num_gpu_experts == 58 * 20
    with pytest.raises(ValueError, match="no routed experts"):
        p24.experts(2)
    with pytest.raises(KeyError):
        p24.module("model.layers.0.mlp.experts")


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_first_match_wins_and_layer_ranges():
    config = model_with_layers(8)  # layers 1-7 MoE
    p = parse_placement(
        r"""
rules:
  - match: '\.experts$'
    layers: [2, "4-5"]
    device: cpu
    format: int8
  - match: '\.experts$'
    layers: 7
    device: gpu
    format: bf16
  - match: '\.experts$'
    device: cpu
  - match: '\.experts$'
    device: cpu
    format: bf16
  - match: 'self_attn'
    layers: "1-3"
    device: gpu
    format: bf16
  - device: gpu
    format: fp8
""",
        config,
    )
    formats = {i: p.module(f"model.layers.{i}.mlp.experts") for i in range(1, 8)}
    assert formats == {
        1: ("cpu", "int4"),
        2: ("cpu", "int8"),
        3: ("cpu", "int4"),
        4: ("cpu", "int8"),
        5: ("cpu", "int8"),
        6: ("cpu", "int4"),
        7: ("gpu", "bf16"),
    }
    assert p.experts(7).gpu_experts == tuple(range(16))
    attn = [p.module(f"model.layers.{i}.self_attn")[1] for i in range(8)]
    assert attn == ["fp8", "bf16", "bf16", "bf16", "fp8", "fp8", "fp8", "fp8"]
    assert p.module("model.embed_tokens") == ("gpu", "bf16")
    assert p.gpu_formats() == ("fp8", "bf16")


def model_with_layers(n: int) -> ModelConfig:
    return ModelConfig.from_hf(tiny_v3_config(num_hidden_layers=n))


def profile_json(config: ModelConfig, hot: dict[int, list[int]]) -> dict:
    """Counts: the experts in hot[layer] get 100 - rank, the others their id % 7."""
    layers = {}
    for layer in config.moe_layers:
        counts = [e % 7 for e in range(config.n_routed_experts)]
        for rank, e in enumerate(hot.get(layer, [])):
            counts[e] = 100 - rank
        layers[str(layer)] = counts
    return {"model": "tiny", "layers": layers, "tokens": 1000}


def test_gpu_experts_int_list_and_hottest(tmp_path):
    text = r"""
rules:
  - match: '\.experts$'
    layers: 1
    device: cpu
    gpu_experts: [9, 3, 12]
    gpu_format: bf16
  - match: '\.experts$'
    device: cpu
    gpu_experts: {GPU}
    deferred: 3
  - device: gpu
"""
    p = parse_placement(text.replace("{GPU}", "4"), TINY)
    assert p.experts(1) == ExpertPlacement("int4", (3, 9, 12), "bf16", 0)
    assert p.experts(2) == ExpertPlacement("int4", (0, 1, 2, 3), "fp8", 3)
    assert p.experts(2).cpu_experts(16) == tuple(range(4, 16))
    with pytest.raises(PlacementError, match=r"<string>:10: rules\[1\]\.gpu_experts: .*profile"):
        parse_placement(text.replace("{GPU}", "{hottest: 2}"), TINY)
    prof = profile_json(TINY, {2: [11, 5, 7]})
    (tmp_path / "prof.json").write_text(json.dumps(prof))
    yaml_text = "profile: prof.json\n" + text.replace("{GPU}", "{hottest: 2}")
    p = load_placement(write(tmp_path, yaml_text), TINY)
    assert p.experts(2).gpu_experts == (5, 11)
    assert p.experts(1).gpu_experts == (3, 9, 12)  # explicit ids ignore the profile
    assert p.profile.tokens == 1000
    # With a profile, a count N means the N hottest; the argument replaces the file's profile.
    p = parse_placement(text.replace("{GPU}", "3"), TINY, profile=prof)
    assert p.experts(2).gpu_experts == (5, 7, 11)
    assert read_profile(tmp_path / "prof.json").hottest(2, 1) == (11,)


def test_gpu_experts_in_packed_int4():
    """gpu_format int4[-gG]: the GPU's experts kept in the CPU's packed int4 (W4A16)."""
    text = "rules:\n  - {match: '\\.experts$', device: cpu, gpu_experts: 2, gpu_format: F}\n"
    p = parse_placement(text.replace("F", "int4-g64") + "  - {device: gpu}\n", TINY)
    assert p.experts(2) == ExpertPlacement("int4", (0, 1), "int4-g64", 0)
    assert p.gpu_formats() == ("fp8", "int4-g64")
    with pytest.raises(PlacementError, match=r"gpu_format: 'int3' is not a GPU expert format"):
        parse_placement(text.replace("F", "int3"), TINY)


def test_profile_errors(tmp_path):
    text = "rules:\n  - {device: gpu}\n"
    prof = profile_json(TINY, {})
    prof["layers"]["2"] = prof["layers"]["2"][:-1]
    with pytest.raises(PlacementError, match=r"<profile>: layers\.2: 15 counts.* 16 routed"):
        parse_placement(text, TINY, profile=prof)
    del prof["layers"]["1"]
    with pytest.raises(PlacementError, match="no counts for MoE layer 1"):
        parse_placement(text, TINY, profile=prof)
    (tmp_path / "bad.json").write_text("{\n  oops")
    with pytest.raises(PlacementError, match=r"bad.json:2: not valid JSON"):
        read_profile(tmp_path / "bad.json")


def test_extends_overrides_runtime_and_appends_rules(tmp_path):
    write(
        tmp_path,
        r"""
rules:
  - match: '\.experts$'
    device: cpu
    format: int8
  - device: gpu
    format: bf16
runtime:
  kv_cache_tokens: 1024
  cpu_threads: 6
""",
        "base.yaml",
    )
    variant = write(
        tmp_path,
        "extends: base.yaml\nruntime:\n  kv_cache_tokens: 2048\n  vram_gb: 11.5\n",
        "variant.yaml",
    )
    p = load_placement(variant, TINY)
    assert p.runtime == RuntimeSettings(cpu_threads=6, kv_cache_tokens=2048, vram_gb=11.5)
    assert p.module("model.layers.1.mlp.experts") == ("cpu", "int8")
    assert [r.source for r in p.rules] == [str(tmp_path / "base.yaml")] * 2
    over = write(
        tmp_path,
        "extends: variant.yaml\nrules:\n  - {match: '\\.experts$', layers: 2, device: gpu}\n",
        "over.yaml",
    )
    p = load_placement(over, TINY)
    assert p.module("model.layers.2.mlp.experts") == ("gpu", "fp8")
    assert p.module("model.layers.1.mlp.experts") == ("cpu", "int8")
    assert p.runtime.kv_cache_tokens == 2048


OK_TAIL = "  - device: gpu\n"
ERRORS = [
    # (yaml, key, the offending line's text, message fragment)
    ("rule:\n  - device: gpu\n", "rule", "rule:", "unknown key"),
    ("rules:\n  - device: gpu\n    fromat: fp8\n", "rules[0].fromat", "fromat", "unknown key"),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n    format: int3\n" + OK_TAIL,
        "rules[0].format",
        "int3",
        "unknown CPU expert format 'int3' (valid: bf16, int8, int4)",
    ),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n    format: int4-g64\n" + OK_TAIL,
        "rules[0].format",
        "int4-g64",
        "input dim 96 is not a multiple of the group size 64",
    ),
    ("rules:\n  - device: gpu\n    format: int4\n", "rules[0].format", "int4", "GPU format"),
    ("rules:\n  - device: tpu\n", "rules[0].device", "tpu", "'tpu' is not a device"),
    ("rules:\n  - match: x\n", "rules[0].device", "match", "missing"),
    ("rules:\n  - match: '(a'\n    device: gpu\n", "rules[0].match", "(a", "not a regex"),
    (
        "rules:\n  - match: mlp\n    device: cpu\n" + OK_TAIL,
        "rules[0].device",
        "cpu",
        "also matches model.layers.0.mlp",
    ),
    (
        "rules:\n  - device: gpu\n    layers: 3-60\n",
        "rules[0].layers",
        "3-60",
        "outside the model (layers 0-2)",
    ),
    (
        "rules:\n  - device: gpu\n    layers:\n      - 1\n      - '2-1'\n",
        "rules[0].layers",
        "'2-1'",
        "backwards",
    ),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n"
        + "    gpu_experts:\n      - 1\n      - 16\n"
        + OK_TAIL,
        "rules[0].gpu_experts",
        "- 16",
        "expert 16 does not exist (the model has 16 routed experts, 0-15)",
    ),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n    gpu_experts: 17\n" + OK_TAIL,
        "rules[0].gpu_experts",
        "17",
        "expected an integer 0..16",
    ),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n    deferred: 4\n" + OK_TAIL,
        "rules[0].deferred",
        "deferred",
        "4 must be less than the experts a token uses (4",
    ),
    (
        "rules:\n  - match: '\\.experts$'\n    device: cpu\n    gpu_experts: {hottest: 2}\n"
        + OK_TAIL,
        "rules[0].gpu_experts",
        "hottest",
        "needs an expert profile",
    ),
    (
        "rules:\n  - device: gpu\n    gpu_experts: 2\n",
        "rules[0].gpu_experts",
        "gpu_experts",
        "only for experts on the CPU",
    ),
    (
        "# experts only\nrules:\n  - match: '\\.experts$'\n    device: cpu\n",
        "rules",
        "rules:",
        "no rule matches model.embed_tokens",
    ),
    (
        "rules:\n  - layers: 1-2\n    device: gpu\n",
        "rules",
        "rules:",
        "no rule matches model.embed_tokens",
    ),
    (
        "rules: [{device: gpu}]\nruntime:\n  kv_cache_tokens: -1\n",
        "runtime.kv_cache_tokens",
        "-1",
        "expected an integer >= 0",
    ),
    ("rules: [{device: gpu}]\nruntime:\n  vram_gb: 0\n", "runtime.vram_gb", "vram", "GiB > 0"),
    ("rules: [{device: gpu}]\nruntime:\n  threads: 4\n", "runtime.threads", "threads", "unknown"),
    ("rules: [{device: gpu}]\nruntime:\n  pin_experts: 2\n", "runtime.pin_experts", "2", "or auto"),
    ("rules:\n  - device: gpu\n    device: cpu\n", "rules[0].device", "cpu", "given twice"),
    ("rules:\n  - device: gpu\n\tformat: fp8\n", "(syntax)", "\t", "cannot start any token"),
    ("rules: [{device: gpu}]\nextends: nope.yaml\n", "extends", "nope", "no such file"),
    ("rules: [{device: gpu}]\nprofile: nope.json\n", "profile", "nope", "no such file"),
    ("", "rules", "", "empty"),
]


@pytest.mark.parametrize("text,key,line_text,fragment", ERRORS, ids=[e[1] for e in ERRORS])
def test_errors_name_file_line_and_key(tmp_path, text, key, line_text, fragment):
    path = write(tmp_path, text)
    lines = text.splitlines()
    line = next((i + 1 for i, s in enumerate(lines) if line_text in s), 1)
    with pytest.raises(PlacementError) as e:
        load_placement(path, TINY)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: {key}: "), msg
    assert fragment in msg, msg


def test_error_in_extended_file_names_that_file(tmp_path):
    write(tmp_path, "rules:\n  - device: gpu\n    format: fp16\n", "base.yaml")
    variant = write(tmp_path, "extends: base.yaml\n", "variant.yaml")
    with pytest.raises(PlacementError, match=re.escape(f"{tmp_path / 'base.yaml'}:3: rules[0]")):
        load_placement(variant, TINY)
    write(tmp_path, "extends: variant.yaml\n", "base.yaml")
    with pytest.raises(PlacementError, match="extends: .*cycle"):
        load_placement(variant, TINY)


def test_default_placement():
    p = default_placement(TINY)  # tiny-v3 is an FP8 checkpoint
    assert p.module("model.layers.1.mlp.experts") == ("cpu", "int4")
    assert p.experts(1) == ExpertPlacement("int4", (), "fp8", 0)
    assert p.module("model.layers.0.self_attn") == ("gpu", "fp8")
    assert p.runtime == RuntimeSettings()
    v2 = model("tiny-v2")
    assert default_placement(v2).module("model.layers.0.mlp") == ("gpu", "bf16")
    assert default_placement(v2, fp8_checkpoint=True).module("model.layers.0.mlp")[1] == "fp8"
    # A tiny model fits a 24 GiB GPU whole; 1.5 GiB leaves no room past the reserve.
    assert default_placement(TINY, 24 * GIB).module("model.layers.1.mlp.experts") == ("gpu", "fp8")
    assert default_placement(TINY, 1.5 * GIB).num_gpu_experts == 0


def test_default_placement_fills_spare_vram_with_experts():
    from hetero.plan import plan_memory

    v3 = model("deepseek-v3")
    p = default_placement(v3, 48 * GIB)
    n = len(p.experts(3).gpu_experts)
    assert 8 <= n < 256 and p.num_gpu_experts == 58 * n
    assert p.experts(60).gpu_experts == tuple(range(n))
    plan = plan_memory(v3, p, 48 * GIB, 1024 * GIB)
    assert plan.fits and plan.kv_tokens >= 32768
    assert default_placement(v3, 20 * GIB).num_gpu_experts == 0
