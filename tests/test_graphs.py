"""Decode steps cut into graph segments (hetero.sched.graphs) against the plain model: eagerly on
the CPU here, as CUDA graphs on the GPU (marked gpu)."""

from __future__ import annotations

import copy

import pytest
import torch

from hetero.config import ModelConfig
from hetero.loader import load_model
from hetero.model import ForwardBatch
from hetero.placement import parse_placement
from hetero.sched.graphs import GraphedDecoder
from hetero.sched.runtime import HybridOptions, load_hybrid
from hetero.testing import write_tiny_v3

PROMPTS = ([5, 9, 2, 33, 7, 1, 12], [3, 4], [8, 8, 8])
STEPS = 5


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return write_tiny_v3(tmp_path_factory.mktemp("v3"))


def hybrid(path, device, deferred):
    config = ModelConfig.from_hf(path)
    text = (
        "rules:\n  - {match: '\\.mlp\\.experts$', device: cpu, format: int8, gpu_experts: [2],"
        f" gpu_format: bf16, deferred: {deferred}}}\n  - {{device: gpu, format: bf16}}\n"
    )
    opts = HybridOptions(
        device=device, dtype=torch.float32, progress=False,
        gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9,
    )  # fmt: skip
    return load_hybrid(path, parse_placement(text, config), opts)


def decode_both(model, device, graphs):
    """Prefill with the model, then the same greedy steps with the plain model (on a copy of the
    cache) and with the segmented decoder: their logits at each step."""
    B = len(PROMPTS)
    lens = [len(p) for p in PROMPTS]
    cache = model.new_cache(B, 32)
    batch = ForwardBatch.build(list(range(B)), lens, lens, device)
    ids = torch.tensor([t for p in PROMPTS for t in p], device=device)
    nxt = model(ids, batch, cache, last_only=True).argmax(-1)
    plain_cache = copy.deepcopy(cache)
    decoder = GraphedDecoder(model, cache, graphs=graphs)
    pairs = []
    for _ in range(STEPS):
        positions = torch.tensor(lens, device=device)
        lens = [n + 1 for n in lens]
        step = ForwardBatch.build(list(range(B)), [1] * B, lens, device)
        want = model(nxt, step, plain_cache, last_only=True)
        got = decoder.step(nxt, positions)
        pairs.append((got.cpu(), want.cpu()))
        nxt = want.argmax(-1)
    return pairs


def assert_close(pairs, tol):
    for i, (got, want) in enumerate(pairs):
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, f"step {i}: {err:.2e}"


def test_segments_equal_the_model(v3):
    model = load_model(v3, dtype=torch.float32, progress=False)
    assert_close(decode_both(model, "cpu", graphs=False), 1e-5)


@pytest.mark.parametrize("attention", ["auto", "flashinfer"])
def test_segments_with_flashinfer_installed_over_a_cache_it_does_not_take(v3, monkeypatch,
                                                                           attention):  # fmt: skip
    """With flashinfer installed, its backends over a contiguous cache (no pages: the kernel
    never applies) decode as the model does: the segments plan nothing for it."""
    from hetero.gpu import flashinfer_mla

    monkeypatch.setattr(flashinfer_mla, "available", lambda: True)
    model = load_model(v3, dtype=torch.float32, attention=attention, progress=False)
    assert_close(decode_both(model, "cpu", graphs=False), 1e-5)


@pytest.mark.parametrize("deferred", [0, 2])
def test_segments_with_cpu_experts_and_deferral(v3, deferred):
    h = hybrid(v3, "cpu", deferred)
    try:
        assert_close(decode_both(h.model, "cpu", graphs=False), 1e-5)
    finally:
        h.close()


@pytest.mark.gpu
@pytest.mark.parametrize("deferred", [0, 2])
def test_cuda_graphs_equal_the_model(v3, deferred):
    h = hybrid(v3, "cuda", deferred)
    try:
        assert_close(decode_both(h.model, "cuda", graphs=True), 1e-4)
    finally:
        h.close()


def test_rotary_tables_never_move_under_captured_graphs(v3):
    """Graphs keep the rotary tables' addresses: the decoder makes them cover the model's
    context up front, so no later (longer) step reallocates them."""
    model = load_model(v3, dtype=torch.float32, progress=False)
    rotary = model.model.rotary
    GraphedDecoder(model, model.new_cache(1, 32), graphs=False)
    cos, context = rotary.cos, model.config.max_position_embeddings
    assert cos.shape[0] >= context
    rotary.full_tables(context, cos.device)  # the longest step the model allows
    assert rotary.cos is cos


def test_generate_through_the_segments(v3):
    """generate(graphs=True) decodes from the segments once every prompt is in: the same tokens,
    with a sequence that stops early (its slot keeps stepping, its outputs dropped) and with
    chunked prefill."""
    from hetero.generate import SamplingParams, generate

    model = load_model(v3, dtype=torch.float32, progress=False)
    prompts = [list(p) for p in PROMPTS]
    early = generate(model, prompts, SamplingParams(max_tokens=10))[1][3]
    for stop in ((), (early,)):
        params = SamplingParams(max_tokens=10, stop_token_ids=stop)
        want = generate(model, prompts, params)
        assert generate(model, prompts, params, graphs=True) == want
        assert generate(model, prompts, params, prefill_chunk=2, graphs=True) == want
    assert len(want[1]) == 4  # the early stop happened


@pytest.mark.gpu
def test_cuda_generate_through_graphs(v3):
    from hetero.generate import SamplingParams, generate

    h = hybrid(v3, "cuda", 1)
    try:
        prompts = [list(p) for p in PROMPTS]
        params = SamplingParams(max_tokens=8)
        assert generate(h.model, prompts, params, graphs=True) == generate(h.model, prompts, params)
    finally:
        h.close()
