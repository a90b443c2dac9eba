"""Memory plan: its bytes against loaded models, packed experts and checkpoint files; the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from hetero.cli import main
from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format, pack_experts
from hetero.loader import Checkpoint, load_model, read_index
from hetero.placement import load_placement, parse_placement
from hetero.plan import (
    ABSORBED_ROW,
    GIB,
    STAGING_ROW,
    PlanError,
    check_fits,
    plan_memory,
)
from hetero.testing import tiny_v3_config, write_v3_index

ROOT = Path(__file__).parent.parent
V3_CONFIG = Path(__file__).parent / "data" / "models" / "deepseek-v3" / "config.json"
EXPERTS = r"'\.mlp\.experts$'"
BIG = 1 << 50  # a budget nothing reaches


def placement(config: ModelConfig, gpu: str, cpu: str = "bf16", gpu_experts: int = 0):
    text = (
        f"rules:\n  - {{match: {EXPERTS}, device: cpu, format: {cpu}, gpu_experts: {gpu_experts}, "
        f"gpu_format: {gpu}}}\n  - {{device: gpu, format: {gpu}}}\n"
    )
    return parse_placement(text, config)


def row_of(name: str) -> str:
    """The plan row a loaded tensor belongs to, decided from its name alone."""
    if name.startswith("model.embed_tokens"):
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    if name.endswith((".w_uk", ".w_uv")):
        return ABSORBED_ROW
    for part, row in (
        (".self_attn.", "attention"),
        (".mlp.gate.", "routers"),
        (".mlp.shared_experts.", "shared experts"),
        (".mlp.experts.", "routed experts (GPU)"),
    ):
        if part in name:
            return row
    return "dense MLP"


@pytest.mark.parametrize("fixture,dtype", [("tiny_v3", torch.bfloat16), ("tiny_v2", torch.float32)])
def test_bf16_plan_equals_loaded_sizes(request, fixture, dtype):
    path = request.getfixturevalue(fixture)
    model = load_model(path, device="cpu", dtype=dtype, progress=False)
    model.absorb_attention()  # (a budget of BIG has room for it)
    loaded: dict[str, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if "rotary" not in name:  # cos/sin tables grow at run time: in the GPU reserve
            loaded[row_of(name)] = loaded.get(row_of(name), 0) + t.nbytes
    config = model.config
    plan = plan_memory(config, placement(config, "bf16"), BIG, BIG, dtype=dtype)
    experts = loaded.pop("routed experts (GPU)")
    assert {r: plan.row(r).gpu_bytes for r in loaded} == loaded
    assert plan.gpu_weight_bytes == sum(loaded.values())
    # Every expert on the GPU: the whole model.
    all_gpu = parse_placement("rules: [{device: gpu, format: bf16}]", config)
    plan = plan_memory(config, all_gpu, BIG, BIG, dtype=dtype)
    assert plan.row("routed experts (GPU)").gpu_bytes == experts
    assert plan.gpu_weight_bytes == sum(loaded.values()) + experts
    assert plan.row("routed experts (CPU)").ram_bytes == 0


def fp8_linear_bytes(out: int, inp: int) -> int:
    return out * inp + 4 * math.ceil(out / 128) * math.ceil(inp / 128)


def test_fp8_plan_by_hand():
    """tiny-v3: hidden 192, q_lora 96, 4 heads of 32+16 (q/k) and 32 (v), kv_lora 64."""
    config = ModelConfig.from_hf(tiny_v3_config())
    H, I, E, V = 192, 96, 16, 1024
    attn = sum(
        fp8_linear_bytes(o, i)
        for o, i in ((96, H), (4 * 48, 96), (64 + 16, H), (4 * (32 + 32), 64), (H, 4 * 32))
    )
    plan = plan_memory(config, placement(config, "fp8", gpu_experts=3), BIG, BIG)
    rows = {r.name: r.gpu_bytes for r in plan.rows}
    assert rows["attention"] == 3 * attn
    assert rows["dense MLP"] == 2 * fp8_linear_bytes(320, H) + fp8_linear_bytes(H, 320)
    expert = 2 * fp8_linear_bytes(I, H) + fp8_linear_bytes(H, I)
    assert rows["shared experts"] == 2 * expert  # 1 shared expert of I, 2 MoE layers
    assert rows["routed experts (GPU)"] == 2 * 3 * expert
    assert rows["routers"] == 2 * (E * H * 2 + E * 4)  # bf16 weight + fp32 correction bias
    assert rows["embed_tokens"] == rows["lm_head"] == V * H * 2
    assert rows["norms"] == 2 * (3 * (2 * H + 96 + 64) + H)  # 2 bytes x (4 per layer + final)
    assert rows[ABSORBED_ROW] == 3 * 4 * (32 + 32) * 64 * 2  # W_UK, W_UV [heads, 32, 64] bf16


def test_no_absorbed_copies_where_the_kernels_run():
    """On a GPU the Triton / flashinfer attention reads W_UK / W_UV from kv_b_proj: the plan
    keeps no dense copies for it (`absorbs`), so their bytes go to the KV cache."""
    from hetero.sched.runtime import absorbs

    assert not any(absorbs(a, True) for a in ("auto", "triton", "flashinfer"))
    assert absorbs("absorbed", True) and absorbs("triton", False)  # the torch forms
    assert not absorbs("naive", False)  # (it multiplies by kv_b_proj itself)
    config = ModelConfig.from_hf(tiny_v3_config())
    with_copies = plan_memory(config, placement(config, "fp8"), BIG, BIG)
    plan = plan_memory(config, placement(config, "fp8"), BIG, BIG, absorb=False)
    assert with_copies.absorb_mla and not plan.absorb_mla
    assert plan.row(ABSORBED_ROW).gpu_bytes == 0 and "not needed" in plan.row(ABSORBED_ROW).detail
    assert plan.gpu_weight_bytes == with_copies.gpu_weight_bytes - 3 * 4 * (32 + 32) * 64 * 2


def test_fp8_plan_equals_checkpoint_files(tiny_v3):
    """An FP8 checkpoint's own bytes (weight + weight_scale_inv as stored) for what goes on the
    GPU: all but the routed experts of CPU and the MTP layer."""
    config = ModelConfig.from_hf(tiny_v3)
    ckpt = Checkpoint(tiny_v3)
    L = config.num_hidden_layers

    def on_gpu(name: str) -> bool:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= L:
            return False  # MTP
        return ".mlp.experts." not in name or int(parts[5]) < 2  # experts 0, 1 on the GPU

    stored = sum(info.nbytes for name, info in ckpt.tensors.items() if on_gpu(name))
    plan = plan_memory(config, placement(config, "fp8", gpu_experts=2), BIG, BIG)
    assert plan.gpu_weight_bytes - plan.row(ABSORBED_ROW).gpu_bytes == stored


@pytest.mark.parametrize("spec", ["int4", "int8", "int8-g32", "bf16"])
@pytest.mark.parametrize("gpu_experts", [0, 5])
def test_cpu_experts_equal_packed_bytes(spec, gpu_experts):
    config = ModelConfig.from_hf(tiny_v3_config())
    E, H, I = (
        config.n_routed_experts - gpu_experts,
        config.hidden_size,
        config.moe_intermediate_size,
    )
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    packed = pack_experts(gate, up, torch.randn(E, H, I, generator=g), Format.parse(spec))
    layer_bytes = sum(a.nbytes for a in packed.arrays().values())
    plan = plan_memory(config, placement(config, "bf16", spec, gpu_experts), BIG, BIG)
    row = plan.row("routed experts (CPU)")
    assert row.ram_bytes == len(config.moe_layers) * layer_bytes
    assert row.gpu_bytes == 0


def test_kv_cache_and_fits():
    config = ModelConfig.from_hf(tiny_v3_config())
    per_token = 3 * (64 + 16) * 2  # layers x (kv_lora_rank + rope dim) x bf16
    base = placement(config, "fp8")
    big = plan_memory(config, base, BIG, BIG)
    fixed = big.gpu_fixed_bytes - big.row(ABSORBED_ROW).gpu_bytes  # (no room for it below)
    vram = fixed + 1000 * per_token + 100
    plan = plan_memory(config, base, vram, BIG)
    assert plan.kv_bytes_per_token == per_token
    assert plan.kv_tokens_fit == 1000
    assert (plan.kv_tokens, plan.kv_pages, plan.kv_page_size) == (960, 15, 64)  # whole pages
    assert not plan.fits  # with kv_cache_tokens 0 the cache needs one prefill chunk: 2048
    assert "KV cache for 2048 tokens" in plan.reasons[0]
    text = "runtime: {kv_cache_tokens: 500, prefill_chunk: 256, kv_page_size: 100}\n"
    rules = f"rules:\n  - {{match: {EXPERTS}, device: cpu, format: bf16}}\n  - {{device: gpu}}\n"
    plan = plan_memory(config, parse_placement(rules + text, config), vram, BIG)
    assert (plan.kv_tokens, plan.kv_pages, plan.fits) == (500, 5, True)
    assert plan.row("KV cache").gpu_bytes == 500 * per_token
    assert "5 pages x 100 tok" in plan.table() and "5 pages x 100 = 500 tokens" in plan.table()
    assert plan.to_dict()["kv_bytes"] == 500 * per_token
    check_fits(plan)
    plan = plan_memory(
        config, parse_placement(rules + text.replace("500", "2000"), config), vram, BIG
    )
    assert (plan.kv_tokens, plan.kv_tokens_needed, plan.fits) == (1000, 2000, False)  # 10 pages
    assert "for 2000 tokens" in plan.reasons[0] and "DOES NOT FIT" in plan.table()
    with pytest.raises(PlanError, match=r"does not fit: GPU needs .* GiB budget"):
        check_fits(plan)
    plan = plan_memory(config, base, BIG, 4 * GIB)
    assert not plan.fits and plan.reasons[0].startswith("RAM needs")


def test_absorbed_attention_only_where_vram_allows(tiny_v3):
    """The plan keeps W_UK/W_UV dense when weights + reserve + them + the KV cache's minimum
    fit; else it leaves them out (and the model dequantizes kv_b_proj at every call). Loading
    absorbed changes no logit."""
    config = ModelConfig.from_hf(tiny_v3)
    base = placement(config, "fp8")
    big = plan_memory(config, base, BIG, BIG)
    absorbed = big.row(ABSORBED_ROW).gpu_bytes
    assert big.absorb_mla and absorbed > 0
    minimum = big.gpu_fixed_bytes - absorbed + big.kv_tokens_needed * big.kv_bytes_per_token
    for vram, want in ((minimum + absorbed, True), (minimum + absorbed - 1, False)):
        plan = plan_memory(config, base, vram, BIG)
        assert (plan.absorb_mla, plan.fits) == (want, True)
        assert plan.row(ABSORBED_ROW).gpu_bytes == (absorbed if want else 0)
    assert "no room: off" in plan.table()

    from hetero.model.batch import ForwardBatch

    model = load_model(tiny_v3, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.arange(7) * 37 % config.vocab_size
    batch = ForwardBatch.build([0], [7], [7])
    want = model(ids, batch, model.new_cache(1, 8))
    model.absorb_attention()
    assert model.model.layers[0].self_attn.w_uk.shape == (4, 32, 64)
    torch.testing.assert_close(model(ids, batch, model.new_cache(1, 8)), want, rtol=0, atol=0)


def test_tied_embeddings_count_once():
    config = ModelConfig.from_hf(tiny_v3_config(tie_word_embeddings=True))
    plan = plan_memory(config, placement(config, "bf16"), BIG, BIG)
    assert plan.row("lm_head").gpu_bytes == 0 and plan.row("lm_head").detail == "tied"


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    """DeepSeek-V3's config.json and a full index (163 shards, FP8, MTP layer 61); no weights."""
    return write_v3_index(tmp_path_factory.mktemp("v3"), json.loads(V3_CONFIG.read_text()))


def test_v3_all_on_gpu_equals_index_total(tmp_path, v3_dir):
    """Everything on the GPU in FP8 is the published checkpoint's bytes less the MTP layer."""
    config = ModelConfig.from_hf(v3_dir)
    without_mtp = write_v3_index(tmp_path, json.loads(V3_CONFIG.read_text()), mtp=False)
    total = read_index(without_mtp)["metadata"]["total_size"]
    everything = parse_placement("rules: [{device: gpu, format: fp8}]", config)
    plan = plan_memory(config, everything, BIG, BIG)
    assert plan.gpu_weight_bytes - plan.row(ABSORBED_ROW).gpu_bytes == total


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_v3_24gb(v3_dir, capsys):
    yaml = str(ROOT / "configs" / "deepseek-v3-24gb.yaml")
    code, out, _ = run(
        capsys, "--model", str(v3_dir), "--placement", yaml, "--vram", "24", "--ram", "512"
    )
    assert code == 0, out
    for text in ("routed experts (CPU)", "14848 experts, int4", "KV cache", "MTP layer(s) 61"):
        assert text in out
    assert "int4, page-locked" in out  # runtime.pin_experts auto: 343 GiB of 512 <= 3/4
    assert out.splitlines()[-1].startswith("FITS: GPU 22.")
    code, out, _ = run(
        capsys,
        "--model",
        str(v3_dir),
        "--placement",
        yaml,
        "--vram",
        "24",
        "--ram",
        "512",
        "--json",
    )
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["kv_tokens"] >= 32768
    assert plan["kv_tokens_fit"] >= 32768 and plan["vram_bytes"] == 24 * GIB
    code, out, _ = run(
        capsys, "--model", str(v3_dir), "--placement", yaml, "--vram", "8", "--ram", "512"
    )
    assert code == 1
    assert out.splitlines()[-1].startswith("DOES NOT FIT: GPU needs 17.")
    code, out, _ = run(
        capsys, "--model", str(v3_dir), "--placement", yaml, "--vram", "24", "--ram", "256"
    )
    assert code == 1 and "RAM needs 342.56 GiB of CPU experts" in out
    assert "page-locked" not in out  # (auto: more than 3/4 of the budget)


def test_cli_default_placement_and_errors(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_v3_config()))
    # no --placement: what generate/chat would load, the whole model when it fits the GPU...
    code, out, _ = run(capsys, "--model", str(model), "--vram", "2", "--ram", "64")
    assert code == 0 and "placement: <all on the device>" in out and "FITS" in out
    # ...else the default placement, routed experts on the CPU
    v3 = ROOT / "tests" / "data" / "models" / "deepseek-v3"
    code, out, _ = run(capsys, "--model", str(v3), "--vram", "24", "--ram", "512")
    assert code == 0 and "placement: <default>" in out and "FITS" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - device: gpu\n    format: fp4\n")
    code, _, err = run(capsys, "--model", str(model), "--placement", str(bad))
    assert code == 2 and err.startswith(f"hetero: error: {bad}:3: rules[0].format: 'fp4'")
    code, _, err = run(capsys, "--model", str(tmp_path), "--vram", "2")
    assert code == 2 and "config.json: no such file" in err
    code, _, err = run(capsys, "--model", str(model), "--vram", "-1")
    assert code == 2 and "--vram" in err


def test_int4_cpu_experts_count_a_dequantized_staging_slot_on_the_gpu():
    """Long prefills dequantize a staging slot's int4 experts to bf16 on the GPU
    (fused_moe_int4): the staging row's GPU bytes grow by a slot / (0.5 + 2 / G) x 2 (G = 32)."""
    config = ModelConfig.from_hf(tiny_v3_config())
    rules = f"rules:\n  - {{match: {EXPERTS}, device: cpu, format: FMT}}\n  - {{device: gpu}}\n"
    rows = {}
    for fmt in ("bf16", "int4-g32"):
        plan = plan_memory(config, parse_placement(rules.replace("FMT", fmt), config), BIG, BIG)
        rows[fmt] = plan.row(STAGING_ROW)
    slot = rows["bf16"].ram_bytes // 2
    assert rows["bf16"].gpu_bytes == rows["bf16"].ram_bytes == 2 * slot
    assert rows["int4-g32"].gpu_bytes == 2 * slot + int(slot * 2 / 0.5625)
    assert rows["int4-g32"].ram_bytes == 2 * slot


def test_int4_gpu_experts_and_the_dequantization_cap():
    """int4 GPU experts are dequantized at prefill too (a layer's worth, bf16); whatever the
    slot, the dense copies never pass DEQUANT_BYTES (fused_moe_int4 makes passes)."""
    from hetero.gpu import DEQUANT_BYTES

    config = ModelConfig.from_hf(tiny_v3_config())
    rules = (f"rules:\n  - {{match: {EXPERTS}, device: cpu, format: bf16, gpu_experts: 3, "
             f"gpu_format: int4}}\n  - {{device: gpu}}\n")  # fmt: skip
    row = plan_memory(config, parse_placement(rules, config), BIG, BIG).row(STAGING_ROW)
    bf16 = 3 * config.hidden_size * config.moe_intermediate_size * 2
    assert row.gpu_bytes == row.ram_bytes + 3 * bf16
    v3 = ModelConfig.from_hf(V3_CONFIG)
    big = load_placement(ROOT / "configs" / "deepseek-v3-24gb.yaml", v3)
    big = dataclasses.replace(big, runtime=dataclasses.replace(big.runtime, staging_gb=8.0))
    row = plan_memory(v3, big, BIG, BIG).row(STAGING_ROW)
    assert row.gpu_bytes == 8 * GIB + DEQUANT_BYTES


def test_pin_experts_auto_locks_only_what_fits_the_ram_budget():
    """runtime.pin_experts: true / false as written, auto (or unset) None, which pins the CPU
    experts where they take at most PIN_AUTO_RAM_SHARE of the RAM budget."""
    from hetero.placement import PIN_AUTO_RAM_SHARE, RuntimeSettings, pins_experts

    config = ModelConfig.from_hf(tiny_v3_config())

    def setting(line: str):
        text = f"rules: [{{device: gpu}}]\nruntime:\n{line}"
        return parse_placement(text, config).runtime.pin_experts

    assert [setting(f"  pin_experts: {v}\n") for v in ("true", "false", "auto")] == [
        True, False, None]  # fmt: skip
    assert setting("  cpu_threads: 2\n") is None
    ram = 100 << 30
    fits, auto = int(PIN_AUTO_RAM_SHARE * ram), RuntimeSettings()
    assert pins_experts(auto, fits, ram) and not pins_experts(auto, fits + 1, ram)
    on, off = RuntimeSettings(pin_experts=True), RuntimeSettings(pin_experts=False)
    assert pins_experts(on, 10 * ram, ram) and not pins_experts(off, 1, ram)
    budget = RuntimeSettings(ram_gb=100)  # the runtime's RAM budget, when none is given
    assert pins_experts(budget, fits) and not pins_experts(budget, fits + 1)
