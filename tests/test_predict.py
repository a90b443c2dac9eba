"""The speed prediction (hetero.predict) on given rates: DeepSeek-V3's numbers against what the
H200 machine measured (broad ranges, no timing), monotonic in the obvious directions, deferral
never slower at batch 1, the published configs, and `hetero plan --predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hetero.cli import main
from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format
from hetero.placement import parse_placement
from hetero.predict import CostModel, Prediction, expected_counts, predict, predict_serving
from hetero.sched.rates import CalibrationError, ExpertCost, Rates
from hetero.testing import tiny_v3_config

ROOT = Path(__file__).resolve().parent.parent
V3 = ROOT / "tests" / "data" / "models" / "deepseek-v3"
SHARED = ROOT.parent / "shared" / "models"
MS = 1e-3
TOKENS = (1, 4, 16, 64, 256)


def h200() -> Rates:
    """The H200 machine as bench/results measured it (int4-g32, 15 engine threads): a layer's
    8 experts at 1 token 2.05 ms (V3 batch 1, defer3: 119 ms a step, 2026-11-24); ~0.3 ms an
    expert at 2-3 tokens and ~0.46 at 4-5 (serve_v3 c16/c64 decode read rates); 1.04 ms at 32
    tokens on AMX (DESIGN.md: T=1024 266 ms); 2.7 TOP/s above. Host 115 GB/s, H2D 51."""
    points = (1, 2, 4, 8, 16, 32, 64, 256)
    cpu = ExpertCost(points, tuple(v * MS for v in (0.245, 0.29, 0.42, 0.8, 0.65, 1.04, 2.1, 8.3)),
                     0.09 * MS)  # fmt: skip
    gpu = ExpertCost(TOKENS, tuple(v * MS for v in (0.01, 0.011, 0.012, 0.025, 0.08)), 0.1 * MS)
    return Rates(
        shape=(7168, 2048), host_read_gbps=115.0, stage_gbps=25.0, h2d_gbps=51.0,
        hbm_gbps=4000.0, gpu_tflops=700.0, gpu_name="NVIDIA H200", cpu={"int4-g32": cpu},
        gpu={"int4-g32": gpu, "fp8": gpu}, threads=15, machine="H200 machine (from bench/results)",
        source="test H200 rates",
    )  # fmt: skip


def roofline(shape, host_gbps: float = 115.0, h2d_gbps: float = 51.0, fmt="int4-g32") -> Rates:
    """An expert costs its bytes at 90% of the host's read bandwidth or its FLOPs at 2.7 TOP/s,
    whichever is longer; on the GPU at 3.5 TB/s or 300 TFLOP/s. h2d 0: no GPU."""
    H, I = shape
    nbytes, flops = Format.parse(fmt).expert_bytes(H, I), 6 * H * I
    cpu = [max(nbytes / (0.9 * host_gbps * 1e9), n * flops / 2.7e12) for n in TOKENS]
    gpu = [max(nbytes / 3.5e12, n * flops / 300e12) for n in TOKENS]
    gpu_side = dict(hbm_gbps=4000.0, gpu_tflops=700.0) if h2d_gbps else {}
    return Rates(
        shape=tuple(shape), host_read_gbps=host_gbps, stage_gbps=40.0, h2d_gbps=h2d_gbps,
        cpu={fmt: ExpertCost(TOKENS, tuple(cpu), 50e-6)},
        gpu={fmt: ExpertCost(TOKENS, tuple(gpu), 0.1e-3)} if h2d_gbps else {}, **gpu_side,
    )  # fmt: skip


def placement(config: ModelConfig, d: int = 3, gpu_experts: int = 0, graphs: int = 64):
    text = (
        f"rules:\n  - {{match: '\\.mlp\\.experts$', device: cpu, format: int4, "
        f"gpu_experts: {gpu_experts}, gpu_format: fp8, deferred: {d}}}\n"
        f"  - {{device: gpu, format: fp8}}\nruntime: {{cuda_graph_max_batch: {graphs}}}\n"
    )
    return parse_placement(text, config)


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    return ModelConfig.from_hf(V3)


def test_v3_on_the_h200_machine(v3):
    p = predict(v3, placement(v3), h200(), (1, 16, 64), (512, 8192))
    # measured: 7.4-8.4 tok/s at batch 1 with deferral (bench/decode.py), the engine 7.9
    assert 6.5 < p.decode_tok_s < 10
    one, c16, c64 = p.decode
    assert one.deferred and not c16.deferred and one.cpu_experts == 8
    assert 0.9 < one.cpu_busy <= 1  # the CPU is the critical path at batch 1
    assert one.tok_s < c16.tok_s < c64.tok_s
    short, long = p.prefill
    assert short.chunks == 1 and long.chunks == 4 and 20 < long.tok_s < 2000
    assert long.modes.get("gpu", 0) + long.modes.get("split", 0) > 0  # long chunks stream
    # with prefill between the decode steps, as bench/throughput.py ran it (random-weight
    # routing, prompts of ~60 new tokens, 16 outputs): measured 9.4-9.9 and 14.8 tok/s
    random = CostModel(routing_alpha=0.69)
    c16 = predict_serving(v3, placement(v3, d=0), h200(), 16, 16, 60, 16, 2048, random)
    c64 = predict_serving(v3, placement(v3, d=0), h200(), 64, 64, 60, 16, 2048, random)
    assert 6 < c16.tok_s < 14 and 10 < c64.tok_s < 21 and c16.tpot_s < c64.tpot_s


@pytest.mark.parametrize("host", [30.0, 115.0, 400.0, 4000.0])
def test_deferral_is_never_slower_at_batch_1(v3, host):
    rates = roofline((7168, 2048), host)
    steps = [predict(v3, placement(v3, d), rates, (1,), ()).decode[0].step_ms for d in range(8)]
    assert all(s <= steps[0] * (1 + 1e-12) for s in steps[1:])
    if host <= 115:  # CPU-bound: deferring hides the GPU's attention under the CPU's work
        assert min(steps) < steps[0]


def test_more_host_bandwidth_decodes_faster(v3):
    rows = [predict(v3, placement(v3), roofline((7168, 2048), h), (1, 16), ()).decode
            for h in (60.0, 115.0, 230.0)]  # fmt: skip
    for c in range(2):
        assert rows[0][c].tok_s < rows[1][c].tok_s < rows[2][c].tok_s


def test_more_concurrency_more_aggregate_tokens(v3):
    levels = (1, 2, 4, 8, 16, 32, 64, 128)
    tiny = ModelConfig.from_hf(tiny_v3_config())
    for config, rates in ((v3, h200()), (tiny, roofline((192, 96)))):
        p = predict(config, placement(config, d=1, graphs=128), rates, levels, ())
        tok_s = [r.tok_s for r in p.decode]
        assert all(a < b for a, b in zip(tok_s, tok_s[1:])), tok_s
    # past cuda_graph_max_batch a step runs eagerly: the tiny model's GPU-bound steps pay
    eager = predict(tiny, placement(tiny, d=1, graphs=16), roofline((192, 96)), (16, 32), ())
    assert eager.decode[2].step_ms > 1.5 * eager.decode[1].step_ms  # (row 0: batch 1)


def test_prefill_without_gpu_stays_on_the_cpu_and_h2d_helps(v3):
    prompts = (2048, 16384)
    none = predict(v3, placement(v3), roofline((7168, 2048), h2d_gbps=0.0), (1,), prompts)
    assert all(set(r.modes) == {"cpu"} for r in none.prefill)
    assert any("no GPU in the calibration" in n for n in none.notes)
    slow, fast = (
        predict(v3, placement(v3), roofline((7168, 2048), h2d_gbps=h), (1,), prompts).prefill
        for h in (8.0, 64.0)
    )
    for a, b, c in zip(none.prefill, slow, fast):
        assert a.tok_s <= b.tok_s * (1 + 1e-9) and b.tok_s <= c.tok_s * (1 + 1e-9)
        assert b.seconds > 0 and a.chunks == b.chunks == -(-a.prompt_tokens // 2048)


def test_gpu_experts_take_work_off_the_cpu(v3):
    rates = h200()
    none, some = (predict(v3, placement(v3, 3, g), rates, (1,), (8192,)) for g in (0, 32))
    assert some.decode[0].cpu_experts == 8 * (256 - 32) / 256
    assert some.decode_tok_s >= none.decode_tok_s
    assert some.prefill[0].seconds <= none.prefill[0].seconds
    everything = parse_placement("rules: [{device: gpu, format: fp8}]", v3)
    p = predict(v3, everything, rates, (1, 16), (512,))  # no CPU experts: the GPU alone
    assert p.decode[0].cpu_busy == 0 and p.decode_tok_s > 3 * none.decode_tok_s


def test_tiny_config_and_its_output(tmp_path):
    config = ModelConfig.from_hf(tiny_v3_config())
    p = predict(config, placement(config, d=1), roofline((192, 96)), (1, 4), (64, 300))
    assert [r.concurrency for r in p.decode] == [1, 4]
    assert all(np.isfinite(r.tok_s) and r.tok_s > 0 for r in (*p.decode, *p.prefill))
    text = p.table()
    for line in ("speed prediction", "decode", "prefill", "note:"):
        assert line in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["decode_tok_s"] == p.decode_tok_s and d["cost_model"]["routing_alpha"] == 1.0
    with pytest.raises(CalibrationError, match="measured 7168x2048 experts, this model's"):
        predict(config, placement(config), h200())


def test_expected_counts():
    one = expected_counts(1, 8, 256, 256)  # batch 1: k experts of one token
    assert one.sum() == 8 and set(one) == {0, 1}
    many = expected_counts(2048, 8, 256, 256)
    assert many.sum() == pytest.approx(2048 * 8, rel=0.01) and many.min() > 30
    assert np.all(np.diff(many) >= 0)  # ascending
    half = expected_counts(2048, 8, 256, 128)  # half of the layer's experts
    assert half.sum() == pytest.approx(1024 * 8, rel=0.01)
    assert (expected_counts(64, 8, 256, 256, alpha=0.69) > 0).sum() < (many > 0).sum()
    assert (expected_counts(64, 8, 256, 256, alpha=0.69) > 0).sum() < 150  # 222 independent
    assert expected_counts(5, 4, 4, 4).tolist() == [5.0] * 4  # every expert every token
    assert expected_counts(0, 8, 256, 16).sum() == 0 and expected_counts(9, 8, 256, 0).size == 0


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "moonlight"])
def test_published_configs(name):
    path = SHARED / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} is not in this checkout")
    config = ModelConfig.from_hf(path)
    shape = config.hidden_size, config.moe_intermediate_size
    p = predict(config, placement(config, d=1), roofline(shape), (1, 16), (4096,))
    assert all(r.tok_s > 0 for r in (*p.decode, *p.prefill))
    assert p.decode[0].cpu_experts == config.num_experts_per_tok


def plan(capsys, *args: str) -> tuple[int, str, str]:
    yaml = str(ROOT / "configs" / "deepseek-v3-24gb.yaml")
    argv = ["plan", "--model", str(V3), "--placement", yaml, "--vram", "141", "--ram", "512"]
    code = main([*argv, "--predict", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_predict(tmp_path, capsys):
    rates = tmp_path / "h200.json"
    rates.write_text(json.dumps(h200().to_dict()))
    code, out, _ = plan(capsys, "--calibration", str(rates))
    assert code == 0, out
    for text in ("FITS", "speed prediction: deepseek_v3", "calibration: " + str(rates), "decode",
                 "prefill", "CPU experts/layer", "cpu/split/gpu"):  # fmt: skip
        assert text in out, text
    code, out, _ = plan(capsys, "--calibration", str(rates), "--json", "--concurrency", "1,4",
                        "--prompt-lengths", "1000,3000")  # fmt: skip
    d = json.loads(out)
    assert code == 0 and d["fits"]
    pred = d["prediction"]
    assert [r["concurrency"] for r in pred["decode"]] == [1, 4]
    assert [r["prompt_tokens"] for r in pred["prefill"]] == [1000, 3000]
    assert pred["prefill"][1]["chunks"] == 2 and pred["decode_tok_s"] > 0


def test_cli_plan_predict_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, _, err = plan(capsys, "--calibration", str(bad))
    assert code == 2 and "not a readable JSON file" in err
    other = tmp_path / "int8.json"
    rates = h200().to_dict()
    rates["cpu"] = {"int8": rates["cpu"]["int4-g32"]}
    other.write_text(json.dumps(rates))
    code, _, err = plan(capsys, "--calibration", str(other))
    assert code == 2 and "no CPU cost for int4-g32" in err and "it has: int8" in err
    with pytest.raises(SystemExit):
        plan(capsys, "--concurrency", "0,4")


def test_pinned_experts_stream_a_large_decode_steps_busiest_experts(v3):
    """With page-locked experts a decode step of DIRECT_POLICY_MIN_TOKENS or more takes the
    policy's split (the CPU keeps the experts with few tokens, the GPU streams the rest): at
    concurrency 64 faster than all on the CPU, with less of the CPU busy; batch 1 unchanged."""
    rules = (
        "rules:\n  - {match: '\\.mlp\\.experts$', device: cpu, format: int4}\n"
        "  - {device: gpu, format: fp8}\n"
    )

    def rows(pin: str) -> dict:
        p = parse_placement(rules + f"runtime: {{pin_experts: {pin}}}\n", v3)
        return {r.concurrency: r for r in predict(v3, p, h200(), (1, 64), ()).decode}

    locked, gathered = rows("true"), rows("false")
    assert locked[1] == gathered[1]
    assert locked[64].step_ms < gathered[64].step_ms
    assert locked[64].cpu_busy * locked[64].step_ms < gathered[64].cpu_busy * gathered[64].step_ms


def test_whole_prompt_chunks_and_pinned_experts_prefill_faster(v3):
    """A prompt in one chunk streams each layer's experts once, not once a chunk; page-locked
    experts (runtime.pin_experts) skip the gather into the staging slots."""
    rules = (
        "rules:\n  - {match: '\\.mlp\\.experts$', device: cpu, format: int4}\n"
        "  - {device: gpu, format: fp8}\n"
    )

    def seconds(runtime: str) -> float:
        p = parse_placement(rules + f"runtime: {{{runtime}}}\n", v3)
        return predict(v3, p, h200(), (1,), (8192,)).prefill[0].seconds

    chunked = seconds("prefill_chunk: 2048, pin_experts: false")
    whole = seconds("prefill_chunk: 8192, pin_experts: false")
    pinned = seconds("prefill_chunk: 8192, pin_experts: true")
    assert chunked > whole > pinned > 0
    # auto (the default): pinned where V3's ~370 GiB of int4 experts fit 3/4 of the RAM budget
    assert seconds("prefill_chunk: 8192, ram_gb: 1024") == pinned
    assert seconds("prefill_chunk: 8192, pin_experts: auto, ram_gb: 256") == whole


def test_page_locked_experts_stream_at_their_own_measured_share(v3):
    """Streaming straight from page-locked experts runs at CostModel.direct_stream_efficiency of
    H2D (measured 0.94-0.96), the gathered stream at stream_efficiency (0.65-0.75); the notes
    say which."""
    rules = (
        "rules:\n  - {match: '\\.mlp\\.experts$', device: cpu, format: int4}\n"
        "  - {device: gpu, format: fp8}\n"
    )

    def run(pin: str, **model) -> Prediction:
        p = parse_placement(rules + f"runtime: {{prefill_chunk: 8192, pin_experts: {pin}}}\n", v3)
        return predict(v3, p, h200(), (1,), (8192,), CostModel(**model))

    direct, slow = run("true"), run("true", direct_stream_efficiency=0.7)
    assert direct.prefill[0].seconds < slow.prefill[0].seconds
    assert any("95% of the calibrated pinned H2D" in n and "page-locked" in n for n in direct.notes)
    gathered = run("false")
    assert run("false", direct_stream_efficiency=0.3).prefill[0] == gathered.prefill[0]
    assert any("70% " in n and "gathered into pinned slots" in n for n in gathered.notes)
