"""bench/throughput.py on the demo model, on the CPU: its lines parse, carry their fields and count
every token; the length distributions' parser. No timings are asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving_load import Dist, parse_dist, percentiles  # noqa: E402
from bench.throughput import main  # noqa: E402

FIELDS = (
    "workload machine config serving concurrency requests prompt_tokens output_tokens wall_s "
    "output_tok_s req_s ttft_ms tpot_ms e2e_ms prefix_hit_share preemptions steps mean_batch "
    "mean_step_tokens host_read_gbps naive_tok_s vs_naive"
).split()
SMALL = ["--workload", "demo", "--device", "cpu", "--page-size", "8", "--kv-cache-tokens", "2048"]


def lines(capsys, argv: list[str]) -> dict[str, list[dict]]:
    main(argv)
    by_mode: dict[str, list[dict]] = {}
    for line in capsys.readouterr().out.splitlines():
        row = json.loads(line)
        assert row["bench"] == "throughput" and row["workload"] == "demo"
        by_mode.setdefault(row["mode"], []).append(row)
    return by_mode


def check_ordered(row: dict) -> None:
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        p = row[key]
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"], (key, p)


def test_demo_levels(capsys):
    argv = SMALL + ["--concurrency", "1,3", "--requests", "6", "--prompt-len", "uniform:20,40"]
    argv += ["--output-len", "fixed:4", "--shared-prefix", "16", "--warmup", "2"]
    argv += ["--attention-levels", "triton,absorbed"]  # the MLA backend switched between levels
    rows = lines(capsys, argv)
    assert [r["attention"] for r in rows["engine"]] == ["triton", "absorbed"]
    assert [len(rows[m]) for m in ("setup", "naive", "engine")] == [1, 1, 2]
    assert rows["naive"][0]["output_tokens"] == 2 * 4  # --naive 2 by default
    for row, C in zip(rows["engine"], (1, 3)):
        assert all(k in row for k in FIELDS), [k for k in FIELDS if k not in row]
        assert row["concurrency"] == C and row["requests"] == 6
        assert row["output_tokens"] == 6 * 4
        assert row["machine"]["device"] == "cpu" and row["config"]["output_len"] == "fixed:4"
        assert row["prefix_hit_share"] > 0  # 16 shared tokens: two full pages of 8
        assert row["mean_batch"] >= 1 and row["preemptions"] >= 0
        check_ordered(row)
        assert "read_share" not in row  # no CPU engine: all on the device


def test_demo_cpu_experts(capsys):
    """The demo placement: experts on the CPU engine, the read share reported."""
    argv = SMALL + ["--placement", str(ROOT / "configs/demo.yaml"), "--concurrency", "2,2"]
    argv += ["--ring-levels", "1,64"]  # the engine's ring A/B: a 2-token job off it, then on
    argv += ["--ring-heavy-levels", "0,16"]  # and its hand-back to the GEMM paths
    argv += ["--requests", "2x", "--prompt-len", "lognormal:12,0.3", "--output-len", "uniform:2,5"]
    argv += ["--warmup", "1", "--naive", "0", "--settle-s", "0", "--read-bw-gb", "0.125"]
    argv += ["--ab-rounds", "1", "--ab-steps", "2"]  # bench/decode.py's step beside the engine's
    rows = lines(capsys, argv)
    (ab,) = rows["batch1_ab"]
    assert len(ab["engine_tpot_ms"]) == len(ab["decode_ref_ms"]) == 1 and ab["decode_ref_ms"][0] > 0
    assert rows["setup"][0]["host_read_gbps"] > 0
    # the ring sizes in effect: none, the demo's int8 experts not being sized for the
    # int8-activation kernels the ring runs (tests/test_ring.py covers the switch itself)
    assert [r["ring_limit"] for r in rows["engine"]] == [0, 0]
    assert [r["ring_heavy"] for r in rows["engine"]] == [0, 16]
    for row in rows["engine"]:
        assert row["requests"] == 4 and "vs_naive" not in row  # (--naive 0)
        assert 4 * 2 <= row["output_tokens"] <= 4 * 5
        assert row["cpu_unique_gb"] > 0 and row["read_share_decode"] > 0
        check_ordered(row)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("normal:5", "unknown distribution 'normal'"),
        ("fixed", "write fixed:N"),
        ("fixed:0", "N must be >= 1"),
        ("fixed:1.5", "'1.5' is not an integer"),
        ("uniform:64", "write uniform:LO,HI"),
        ("uniform:9,3", "need 1 <= LO <= HI"),
        ("lognormal:100,x", "'x' is not a number"),
        ("lognormal:0.5,1", "need MEAN >= 1"),
    ],
)
def test_dist_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dist(spec)


def test_dist_draws():
    rng = np.random.default_rng(0)
    assert parse_dist("fixed:7").draw(rng, 3) == [7, 7, 7]
    u = parse_dist("uniform:3,5").draw(rng, 200)
    assert min(u) == 3 and max(u) == 5
    d = parse_dist("lognormal:200,0.5")
    assert d == Dist("lognormal", 200.0, 0.5) and str(d) == "lognormal:200,0.5"
    x = d.draw(rng, 4000)
    assert min(x) >= 1 and abs(np.mean(x) / 200 - 1) < 0.05


def test_percentiles():
    assert percentiles([]) is None
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["p50"] <= p["p90"] <= p["p99"] <= 100


def test_step_probe_counts_only_the_experts_the_cpu_computed():
    """A step the policy splits (page-locked experts, decode-sized): the probe's unique bytes
    are those of the experts the CPU engine computed, not of those streamed to the GPU; a step
    below the policy's threshold counts every expert it routes to."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from bench.serving_load import StepProbe
    from hetero.cpu_experts.engine import CPUExperts, EngineConfig
    from hetero.cpu_experts.formats import Format, pack_experts
    from hetero.cpu_experts.staging import GroupStaging
    from hetero.sched.hybrid import DIRECT_POLICY_MIN_TOKENS, HybridExperts
    from tests.test_streaming import E, H, I, policy_rates, skewed

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(E, *s, generator=g) for s in ((I, H), (I, H), (H, I))]
    layer = pack_experts(*w, Format.parse("int8"))
    cpu = CPUExperts({0: layer}, EngineConfig(threads=2, gemm_min_tokens=10**9))
    staging = GroupStaging(E * layer.expert_bytes(), "cpu", direct=True)
    routed = HybridExperts(nn.ModuleDict(), layer=0, engine=cpu, num_experts=E, staging=staging,
                           rates=policy_rates("int8", "split"))  # fmt: skip
    step = {}

    def run(work):
        return block.mlp.routed.submit(step["x"], step["ids"], step["w"]).result()

    block = SimpleNamespace(mlp=SimpleNamespace(routed=routed))
    model = SimpleNamespace(model=SimpleNamespace(layers=[block]))
    engine = SimpleNamespace(model=model, runner=SimpleNamespace(run=run))
    probe = StepProbe(engine, cpu)
    each = sum(a.nbytes for a in layer.arrays().values()) / E
    try:
        for T in (DIRECT_POLICY_MIN_TOKENS - 1, DIRECT_POLICY_MIN_TOKENS):
            ids, wts = skewed(T, seed=T)
            step.update(x=torch.randn(T, H, generator=g), ids=ids, w=wts)
            probe.reset()
            engine.runner.run([SimpleNamespace(n=1)] * T)
            used = set(ids.flatten().tolist())
            split = routed.last_split
            on_cpu = used if split is None else {e for e in used if split.on_cpu[e]}
            assert (split is None) == (T < DIRECT_POLICY_MIN_TOKENS)
            assert 0 < len(on_cpu) < len(used) or split is None
            assert probe.decode_bytes == pytest.approx(len(on_cpu) * each)
    finally:
        cpu.close()
