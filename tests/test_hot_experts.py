"""Hot experts (hetero.sched.hot_experts): the policy alone (plan_swaps, hysteresis, replay), and
on a tiny V3 hybrid with int4 on both sides, where traffic skewed to two experts pulls them onto
the GPU while the logits stay the reference model's and the engine never computes a GPU expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hybrid import PROMPTS, assert_same, placement

from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format, as_tensor, unpack_expert
from hetero.cpu_experts.store import convert, pack_layer
from hetero.loader import Checkpoint, load_model
from hetero.model import ForwardBatch
from hetero.sched.hot_experts import (
    HotConfig,
    HotExperts,
    LiveSet,
    hit_rate,
    plan_swaps,
    replay,
    summarize,
)
from hetero.sched.hybrid import count_routes
from hetero.sched.runtime import HybridOptions, load_hybrid

HOT = (6, 13)  # experts every token picks (a large correction bias; groups 1 and 3 of 4)
START = (0, 3)  # the placement's GPU experts: group 0, which the bias never picks
DECODE_STEPS = 6


def load(path, cpu_format="int4", gpu="int4", store=None):
    config = ModelConfig.from_hf(path)
    opts = HybridOptions(
        dtype=torch.float32, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9, progress=False,
        store=store,
    )  # fmt: skip
    text = f"[{', '.join(map(str, START))}]"
    return load_hybrid(path, placement(config, cpu_format, text, 0, gpu), opts)


def skew(model) -> None:
    """Every MoE layer's router picks HOT for every token (the bias chooses, never weighs)."""
    for L in model.config.moe_layers:
        model.model.layers[L].mlp.gate.e_score_correction_bias[list(HOT)] += 10.0


def int4_everywhere(path) -> dict[int, object]:
    """Each MoE layer's experts, all of them, packed int4 (row e = expert e)."""
    config = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path, config.fp8_block or (128, 128))
    return {L: pack_layer(ckpt, config, L, Format.parse("int4")) for L in config.moe_layers}


def reference(path, packed):
    """The reference model in fp32 with every expert int4-dequantized, wherever it runs."""
    model = load_model(path, device="cpu", dtype=torch.float32, progress=False)
    for L, layer in packed.items():
        for e, expert in model.model.layers[L].mlp.experts.items():
            for name, w in zip(("gate_proj", "up_proj", "down_proj"), unpack_expert(layer, int(e))):
                getattr(expert, name).weight.data.copy_(w)
    return model


def run(model, between=lambda: None) -> list[torch.Tensor]:
    """Prefill two prompts together, then greedy decode steps, `between` after each step."""
    cache = model.new_cache(len(PROMPTS), 64)
    lens = [len(p) for p in PROMPTS]
    batch = ForwardBatch.build([0, 1], lens, lens)
    logits = [model(torch.tensor([t for p in PROMPTS for t in p]), batch, cache)]
    between()
    for _ in range(DECODE_STEPS):
        nxt = logits[-1][batch.last_token_indices].argmax(-1)  # [B]
        lens = [n + 1 for n in lens]
        batch = ForwardBatch.build([0, 1], [1, 1], lens)
        logits.append(model(nxt, batch, cache))
        between()
    return logits


def check_consistent(routed, packed) -> None:
    """The layer's views agree and hold the right bytes: on_gpu, rows (both copies), the GPU's
    local map and slots, and each expert's packed rows where the layer says it is."""
    gpu, cpu = routed.gpu, routed.engine.layers[routed.layer]
    on_gpu = routed.on_gpu.numpy()
    assert np.array_equal(routed.rows_np, routed.rows.numpy())
    assert np.array_equal(on_gpu, routed.rows_np < 0)
    assert set(np.flatnonzero(on_gpu).tolist()) == set(gpu.experts)
    local = np.full(len(on_gpu), -1)
    local[list(gpu.experts)] = np.arange(len(gpu.experts))
    assert np.array_equal(gpu.local.numpy(), local)
    for i, (name, want) in enumerate(packed.arrays().items()):
        for slot, e in enumerate(gpu.experts):
            assert torch.equal(gpu.arrays[i][slot], as_tensor(want[e]))
            assert np.array_equal(gpu.packed.arrays()[name][slot], want[e])
        for e in np.flatnonzero(~on_gpu):
            assert np.array_equal(cpu.arrays()[name][routed.rows_np[e]], want[e])


@pytest.fixture(scope="module")
def packed(tiny_v3):
    return int4_everywhere(tiny_v3)


@pytest.mark.parametrize("source", ["packed at load", "store"])
def test_swaps_follow_traffic_and_keep_the_model(tiny_v3, packed, tmp_path, source):
    """Traffic skewed to HOT: one swap a layer a step brings both onto the GPU in two steps,
    then nothing moves; every step's logits are the reference model's; after each swap point
    the layer's views agree, and no engine job ever had a GPU expert on its rows. Packed at
    load the engine holds the CPU's experts only (each swap exchanges rows); a store holds all
    (read-only: never written)."""
    store = None
    if source == "store":
        store = convert(tiny_v3, tmp_path / "store", Format.parse("int4"), progress=False)
    hybrid = load(tiny_v3, store=store)
    try:
        model, engine = hybrid.model, hybrid.engine
        moe = model.config.moe_layers
        skew(model)
        hot = HotExperts(model, HotConfig(every=1, max_swaps=1, decay=0.5, min_gain=0.25))
        assert sorted(hot.layers) == list(moe)
        routed = {L: model.model.layers[L].mlp.routed for L in moe}
        jobs = []
        submit = engine.submit

        def spy(layer, x, ids, weights, rows=None, deferred=0):
            gpu = set(routed[layer].gpu.experts)
            jobs.append(layer)
            assert all(rows[e] < 0 for e in gpu) and all(rows[e] >= 0 for e in {*range(16)} - gpu)
            return submit(layer, x, ids, weights, rows, deferred)

        engine.submit = spy
        history = []

        def between():
            history.append(hot.step_done())
            for L in moe:
                check_consistent(routed[L], packed[L])

        got = run(model, between)
        ref = reference(tiny_v3, packed)
        skew(ref)
        assert_same(got, run(ref))
        assert len(jobs) == len(got) * len(moe)
        for step in history:  # (1) at most max_swaps a layer a step
            for L in moe:
                assert sum(s.layer == L for s in step) <= 1
        assert [(s.incoming, s.outgoing) for s in history[0]] == [(6, 0)] * len(moe)
        assert [(s.incoming, s.outgoing) for s in history[1]] == [(13, 3)] * len(moe)
        assert not any(history[2:])
        for L in moe:
            assert routed[L].gpu.experts == HOT  # (slots: 6 took 0's, 13 took 3's)
        rates = hot.summary()  # HOT: 2 of a token's 4 routes; the prefill's 9 tokens miss,
        hits = 1 * 2 + 2 * 2 * (DECODE_STEPS - 1)  # the first decode step hits 6 only
        assert rates["swaps"] == 2 * len(moe)
        assert rates["hit_rate"] == pytest.approx(hits / (4 * (9 + 2 * DECODE_STEPS)))
    finally:
        hybrid.close()


def test_replay_equals_the_live_policy(tiny_v3):
    """The bench's replay of recorded routing gives what HotExperts measured on the model."""
    hybrid = load(tiny_v3)
    try:
        model = hybrid.model
        skew(model)
        config = HotConfig(every=2, max_swaps=1, decay=0.0, min_gain=0.0)
        hot = HotExperts(model, config)
        steps: list[dict[int, np.ndarray]] = []

        def record(L):
            def hook(module, inputs, output) -> None:
                if L == model.config.moe_layers[0]:
                    steps.append({})
                steps[-1][L] = output[1].numpy().copy()

            return hook

        for L in model.config.moe_layers:
            model.model.layers[L].mlp.gate.register_forward_hook(record(L))
        run(model, hot.step_done)
        live = hot.summary()
        start = {L: START for L in model.config.moe_layers}
        replayed = replay(steps, start, 16, config)
        assert summarize(replayed) == live
        for L, s in replayed.items():
            assert set(np.flatnonzero(s.resident).tolist()) == set(hot.layers[L].routed.gpu.experts)
        static = summarize(replay(steps, start, 16, HotConfig(max_swaps=0)))
        assert static["hit_rate"] == 0.0 and static["swaps"] == 0 and live["hit_rate"] > 0.1
    finally:
        hybrid.close()


def test_equal_counts_swap_nothing(tiny_v3):
    """(4) Hysteresis on the model: counts equal everywhere, or a gain below min_gain, move
    nothing; a gain above it moves one expert."""
    hybrid = load(tiny_v3)
    try:
        hot = HotExperts(hybrid.model, HotConfig(every=1, max_swaps=2, decay=0.0, min_gain=0.25))
        counts = {L: h.routed.counts for L, h in hot.layers.items()}
        for c in counts.values():
            c.fill_(7)
        assert hot.step_done() == ()
        for c in counts.values():
            c.fill_(100)
            c[list(START)] = 81  # 100 < 1.25 * 81
        assert hot.step_done() == ()
        for c in counts.values():
            c.fill_(100)
            c[list(START)] = 79
            c[5] = 101  # the hottest CPU expert goes first, then the next one by id
        swaps = hot.step_done()
        assert [(s.incoming, s.outgoing) for s in swaps] == [(5, 0), (1, 3)] * len(counts)
    finally:
        hybrid.close()


@pytest.mark.parametrize(
    "cpu_format, gpu, why",
    [("int8", "int4", "the layer's format must be int4-g32"), ("bf16", "int4", "bf16"),
     ("int4", "bf16", "modules")],
)  # fmt: skip
def test_layers_that_cannot_swap_are_refused(tiny_v3, cpu_format, gpu, why):
    hybrid = load(tiny_v3, cpu_format, gpu)
    try:
        with pytest.raises(ValueError, match=why):
            HotExperts(hybrid.model)
        with pytest.raises(ValueError, match="layer 1 cannot swap"):
            HotExperts(hybrid.model, layers=[1])
    finally:
        hybrid.close()


def test_plan_swaps_pairs_hottest_with_coldest():
    scores = np.array([5.0, 0.0, 9.0, 3.0, 9.0, 1.0])
    resident = np.array([True, True, False, True, False, False])
    assert plan_swaps(scores, resident, 3, 0.0) == [(2, 1), (4, 3)]  # then 1.0 vs 5.0: stop
    assert plan_swaps(scores, resident, 1, 0.0) == [(2, 1)]
    assert plan_swaps(scores, resident, 0, 0.0) == []
    assert plan_swaps(scores, resident, 3, 2.5) == [(2, 1)]  # 9 > 3.5 * 0, not 3.5 * 3
    assert plan_swaps(np.ones(6), resident, 3, 0.0) == []  # equal: no ping-pong


def test_live_set_decays_and_books_hits():
    s = LiveSet([0], 3, HotConfig(every=1, max_swaps=1, decay=0.5, min_gain=0.0))
    s.add(np.array([2, 6, 0]))
    assert (s.hits, s.routes) == (2, 8) and s.swap_point() == [(1, 0)]
    s.add(np.array([4, 0, 0]))  # scores: 0.5 * [2, 6, 0] + [4, 0, 0] = [5, 3, 0]
    assert s.hit_rate == hit_rate(2, 12) and s.swap_point() == [(0, 1)]
    assert hit_rate(0, 0) == 0.0


def test_count_routes_skips_empty_slots():
    ids = torch.tensor([[1, 4, -1], [4, 0, 1]])
    counts = torch.zeros(6, dtype=torch.int64)
    count_routes(counts, ids)
    count_routes(counts, ids[:1])
    assert counts.tolist() == [1, 3, 0, 0, 3, 0]


def test_the_serving_engine_swaps_between_steps(tiny_v3):
    """ServingConfig.hot_experts_every: the engine's runner calls the policy after each step;
    the hot experts come onto the GPU and the greedy tokens stay those of a static engine."""
    from transformers import AutoTokenizer

    from hetero.engine.engine import Engine, ServingConfig
    from hetero.engine.params import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_v3)
    outputs = {}
    for every in (0, 1):
        hybrid = load(tiny_v3)
        skew(hybrid.model)
        config = ServingConfig(page_size=16, kv_cache_tokens=256, hot_experts_every=every)
        engine = Engine(hybrid.model, tokenizer, config)
        try:
            rid = engine.add_request(list(PROMPTS[0]), SamplingParams(max_tokens=8, temperature=0))
            tokens = []
            while engine.has_work:
                tokens += [t for o in engine.step() if o.request_id == rid for t in o.token_ids]
            outputs[every] = tokens
            if every:
                layer = hybrid.model.config.moe_layers[0]
                assert set(HOT) <= set(engine.runner.hot.layers[layer].routed.gpu.experts)
        finally:
            hybrid.close()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8
