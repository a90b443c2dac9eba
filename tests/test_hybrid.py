"""The hybrid model (CPU engine experts + the "GPU" side, here the CPU) against the reference
model on the same weights: exact with d = 0, and equal to a plain-torch deferral with d > 0."""

from __future__ import annotations

import pytest
import torch

from hetero.config import ModelConfig
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, pack_experts, unpack_expert
from hetero.loader import load_model
from hetero.model import ForwardBatch
from hetero.model.fp8 import FP8Linear
from hetero.model.moe import torch_routed_experts
from hetero.placement import parse_placement
from hetero.sched.runtime import HybridOptions, load_hybrid
from hetero.testing import write_tiny_v2, write_tiny_v3

TOL = 1e-5  # fp32 on both sides: rounding only
PROMPTS = ([5, 9, 2, 33, 7, 1, 12], [3, 4])
STEPS = 4


def placement(config: ModelConfig, cpu_format, gpu_experts, deferred, gpu="bf16"):
    """`gpu`: the GPU experts' format, and the other modules' (bf16 where it is int4)."""
    modules = "bf16" if gpu.startswith("int4") else gpu
    text = (
        "rules:\n"
        f"  - {{match: '\\.mlp\\.experts$', device: cpu, format: {cpu_format},"
        f" gpu_experts: {gpu_experts}, gpu_format: {gpu}, deferred: {deferred}}}\n"
        f"  - {{device: gpu, format: {modules}}}\n"
    )
    return parse_placement(text, config, "<test>")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return write_tiny_v2(tmp_path_factory.mktemp("v2"))


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return write_tiny_v3(tmp_path_factory.mktemp("v3"))


def load(path, cpu_format, gpu_experts="[0, 3]", deferred=0, gpu="bf16", **kw):
    config = ModelConfig.from_hf(path)
    opts = HybridOptions(
        dtype=torch.float32, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9, progress=False, **kw
    )
    return load_hybrid(path, placement(config, cpu_format, gpu_experts, deferred, gpu), opts)


def reference(path, hybrid):
    """The reference model in fp32 with each CPU expert's weights as the CPU engine holds them."""
    model = load_model(path, device="cpu", dtype=torch.float32, progress=False)
    for L, packed in hybrid.engine.layers.items():
        rows = hybrid.model.model.layers[L].mlp.routed.rows  # expert id -> engine row, -1: GPU
        for e, expert in model.model.layers[L].mlp.experts.items():
            if rows[int(e)] < 0:
                continue
            gate, up, down = unpack_expert(packed, int(rows[int(e)]))
            expert.gate_proj.weight.data.copy_(gate)
            expert.up_proj.weight.data.copy_(up)
            expert.down_proj.weight.data.copy_(down)
    return model


def run(forward, model) -> list[torch.Tensor]:
    """Prefill two prompts together, then greedy decode steps; every step's logits."""
    cache = model.new_cache(len(PROMPTS), 64)
    lens = [len(p) for p in PROMPTS]
    batch = ForwardBatch.build([0, 1], lens, lens)
    logits = [forward(torch.tensor([t for p in PROMPTS for t in p]), batch, cache)]
    for _ in range(STEPS):
        nxt = logits[-1][batch.last_token_indices].argmax(-1)  # [B]
        lens = [n + 1 for n in lens]
        batch = ForwardBatch.build([0, 1], [1, 1], lens)
        logits.append(forward(nxt, batch, cache))
    return logits


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = TOL) -> None:
    for step, (x, y) in enumerate(zip(a, b)):
        err = ((x - y).norm() / y.norm()).item()
        assert err < tol, f"step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("fixture, cpu_format", [("v2", "bf16"), ("v3", "int8"), ("v3", "int4")])
def test_no_deferral_is_the_model(request, fixture, cpu_format):
    path = request.getfixturevalue(fixture)
    hybrid = load(path, cpu_format)
    try:
        ref = reference(path, hybrid)
        assert_same(run(hybrid.model, hybrid.model), run(ref, ref))
    finally:
        hybrid.close()


def gpu_packed(hybrid, L: int):
    """Layer L's GPU experts kept packed (gpu_format int4), or an empty stand-in."""
    routed = hybrid.model.model.layers[L].mlp.routed
    return getattr(routed, "gpu", None) or type("NoPacked", (), {"arrays": ()})()


@pytest.mark.parametrize("gpu_experts", ["[0, 3, 5]", "16"])
def test_int4_gpu_experts_are_the_model(v3, gpu_experts):
    """gpu_format int4-g32: the GPU's experts stay in the CPU's packed int4 (PackedGPUExperts;
    on CPU tensors their dequantized reference runs): the reference model with those weights.
    With all 16 experts there the layer has no CPU part at all."""
    hybrid = load(v3, "int8", gpu_experts=gpu_experts, gpu="int4")
    try:
        ref = load_model(v3, device="cpu", dtype=torch.float32, progress=False)
        if hybrid.engine is not None:
            ref = reference(v3, hybrid)
        for L in ModelConfig.from_hf(v3).moe_layers:
            routed = hybrid.model.model.layers[L].mlp.routed
            packed = routed if hybrid.engine is None else routed.gpu
            assert not hybrid.model.model.layers[L].mlp.experts  # no modules for them
            for row, e in enumerate(packed.experts):
                expert = ref.model.layers[L].mlp.experts[str(e)]
                for w, got in zip(("gate_proj", "up_proj", "down_proj"),
                                  unpack_expert(packed.packed, row)):  # fmt: skip
                    getattr(expert, w).weight.data.copy_(got)
        assert_same(run(hybrid.model, hybrid.model), run(ref, ref))
    finally:
        hybrid.close()


def test_all_experts_on_cpu_and_sequential_mode(v3):
    """No GPU experts, and the sequential (non-overlapped) baseline: the same numbers."""
    hybrid = load(v3, "int8", gpu_experts="0", overlap=False)
    try:
        ref = reference(v3, hybrid)
        assert_same(run(hybrid.model, hybrid.model), run(ref, ref))
    finally:
        hybrid.close()


def deferred_forward(model, d: int, gpu: set[int], shared: bool):
    """Deferral in plain torch: of a token's CPU experts, the d lowest-weighted are added after
    the next MoE layer's output (after the last one, before the final norm); `shared`: except
    the experts that some token of the step computes now."""

    def lowest(weights, ids):  # [T, k] bool, written without kernels.split_parts
        later = torch.zeros_like(ids, dtype=torch.bool)
        for t in range(ids.shape[0]):
            cpu = [j for j in range(ids.shape[1]) if int(ids[t, j]) not in gpu]
            for j in sorted(cpu, key=lambda j: float(weights[t, j]))[:d]:
                later[t, j] = True
        if shared:
            now = {int(e) for e in ids[~later]} - gpu
            later &= ~torch.tensor([[int(e) in now for e in row] for row in ids])
        return later

    @torch.inference_mode()
    def forward(input_ids, batch, cache):
        dec = model.model
        x, carry = dec.embed_tokens(input_ids), None
        for block in dec.layers:
            x = x + block.self_attn(block.input_layernorm(x), batch, cache, dec.rotary)
            h = block.post_attention_layernorm(x)
            if not block.is_moe:
                x = x + block.mlp(h)
                continue
            moe = block.mlp
            weights, ids = moe.gate(h)
            later = lowest(weights, ids)
            y = torch_routed_experts(moe.experts, h, ids.masked_fill(later, -1), weights)
            y = y + moe.shared_experts(h)
            if carry is not None:
                y = y + carry
            carry = torch_routed_experts(moe.experts, h, ids.masked_fill(~later, -1), weights)
            x = x + y
        if carry is not None:
            x = x + carry
        return model.lm_head(dec.norm(x)).float()

    return forward


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("d", [1, 2])
def test_deferral_equals_plain_torch_reference(v3, d, shared):
    hybrid = load(v3, "int8", deferred=d)
    try:
        for layer in hybrid.model.model.layers:
            if layer.is_moe:
                layer.mlp.routed.share_deferral = shared
                layer.mlp.routed.defer_max_tokens = 10**9  # the 9-token prefill defers too
        ref = reference(v3, hybrid)
        got = run(hybrid.model, hybrid.model)
        assert_same(got, run(deferred_forward(ref, d, {0, 3}, shared), ref))
        if not shared:  # and deferral does change the numbers
            exact = run(ref, ref)
            assert ((got[0] - exact[0]).norm() / exact[0].norm()).item() > 1e-4
    finally:
        hybrid.close()


def test_steps_of_many_tokens_defer_nothing(v3):
    """Above HybridExperts.defer_max_tokens (8) a step is computed whole: the 9-token prefill
    gives the exact model's logits, the 2-token decode steps after it are deferred."""
    hybrid = load(v3, "int8", deferred=1)
    try:
        ref = reference(v3, hybrid)
        got, exact = run(hybrid.model, hybrid.model), run(ref, ref)
        assert_same(got[:1], exact[:1])
        deferred = run(deferred_forward(ref, 1, {0, 3}, shared=True), ref)
        assert_same(got[1:2], deferred[1:2])  # (later steps follow their own greedy tokens)
    finally:
        hybrid.close()


def test_fp8_on_the_gpu(request):
    """FP8 GPU weights: an FP8 checkpoint's blocks kept as they are give the reference model's
    numbers; a bf16 checkpoint is quantized at load: its prefill logits stay near (e4m3 keeps 3
    mantissa bits, ~8% on this random model's logits; a wrong scale or layout gives ~100%)."""
    v3, v2 = request.getfixturevalue("v3"), request.getfixturevalue("v2")
    hybrid = load(v3, "int8", gpu="fp8")
    try:
        assert isinstance(hybrid.model.model.layers[1].self_attn.kv_b_proj, FP8Linear)
        ref = reference(v3, hybrid)
        assert_same(run(hybrid.model, hybrid.model), run(ref, ref))
    finally:
        hybrid.close()
    hybrid = load(v2, "bf16", gpu="fp8")
    try:
        ref = reference(v2, hybrid)
        assert_same(run(hybrid.model, hybrid.model)[:1], run(ref, ref)[:1], tol=0.15)
    finally:
        hybrid.close()


@pytest.mark.parametrize(
    "fixture, gpu", [("v3", "bf16"), ("v3", "fp8"), ("v2", "fp8"), ("v3", "int4-g32")]
)
def test_plan_counts_what_loads(request, fixture, gpu):
    """The memory plan's GPU weights and CPU experts are the bytes the hybrid load allocates."""
    from hetero.plan import plan_memory

    path = request.getfixturevalue(fixture)
    config = ModelConfig.from_hf(path)
    p = placement(config, "int4", "[0, 3]", 1, gpu)
    plan = plan_memory(config, p, vram_bytes=2**34, ram_bytes=2**34)
    opts = HybridOptions(dtype=torch.bfloat16, progress=False)
    hybrid = load_hybrid(path, p, opts)
    hybrid.model.absorb_attention()  # (as load_for_device does when the plan has room)
    try:
        absorbed = [b for n, b in hybrid.model.named_buffers() if n.endswith((".w_uk", ".w_uv"))]
        packed = [t for L in config.moe_layers for t in gpu_packed(hybrid, L).arrays]
        gpu = sum(t.nbytes for t in [*hybrid.model.state_dict().values(), *absorbed, *packed])
        cpu = sum(a.nbytes for L in hybrid.engine.layers.values() for a in L.arrays().values())
        assert plan.gpu_weight_bytes == gpu
        assert plan.row("routed experts (CPU)").ram_bytes == cpu
    finally:
        hybrid.close()


@pytest.mark.parametrize("shape", [(256, 384), (576, 200)])
def test_fp8_linear_matches_block_dequantize(shape):
    from hetero.model.fp8 import block_dequantize, block_quantize

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layer = FP8Linear(shape[1], shape[0])
    layer.weight.data, layer.weight_scale_inv.data = block_quantize(w)
    want = block_dequantize(layer.weight, layer.weight_scale_inv, (128, 128))
    assert torch.equal(layer.dense_weight(torch.float32), want)
    x = torch.randn(3, shape[1])
    assert torch.allclose(layer(x), x @ want.T, rtol=1e-5, atol=1e-5)
    half = layer.dense_weight(torch.bfloat16).float()  # 16-bit path: the scale rounds to bf16
    assert ((half - want).norm() / want.norm()).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("deferred, gpu", [(0, "bf16"), (2, "fp8")])
def test_cuda_hybrid_equals_cpu_hybrid(v3, deferred, gpu):
    """On CUDA: pinned buffers, events and non-blocking copies give the CPU run's numbers."""

    def logits(device):
        config = ModelConfig.from_hf(v3)
        opts = HybridOptions(
            device=device, dtype=torch.float32, progress=False,
            gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9,
        )  # fmt: skip
        h = load_hybrid(v3, placement(config, "int8", "[0, 3]", deferred, gpu), opts)
        try:
            cache = h.model.new_cache(len(PROMPTS), 64)
            lens = [len(p) for p in PROMPTS]
            batch = ForwardBatch.build([0, 1], lens, lens, device)
            ids = torch.tensor([t for p in PROMPTS for t in p], device=device)
            out = [h.model(ids, batch, cache).cpu()]
            for _ in range(STEPS):
                lens = [n + 1 for n in lens]
                batch = ForwardBatch.build([0, 1], [1, 1], lens, device)
                out.append(h.model(torch.tensor([7, 9], device=device), batch, cache).cpu())
            return out
        finally:
            h.close()

    assert_same(logits("cuda"), logits("cpu"), tol=1e-4)


@pytest.mark.gpu
def test_cuda_streamed_prefill_equals_engine(v3):
    """Long prefill streamed to the GPU (staged through pinned memory) equals the CPU engine."""
    config = ModelConfig.from_hf(v3)
    p = placement(config, "int8", "0", 0)
    # the engine's exact path (fp32 GEMV): its int8 activations and bf16 GEMM round on their own
    exact = dict(int8_activations=False, gemm_min_tokens=10**9, gemm_min_tokens_q8=10**9)
    base = dict(device="cuda", dtype=torch.float32, progress=False, **exact)
    runs = []
    for stream in (0, 4):
        h = load_hybrid(v3, p, HybridOptions(**base, stream_min_tokens=stream))
        try:
            lens = [len(q) for q in PROMPTS]
            cache = h.model.new_cache(len(PROMPTS), 64)
            batch = ForwardBatch.build([0, 1], lens, lens, "cuda")
            ids = torch.tensor([t for q in PROMPTS for t in q], device="cuda")
            runs.append([h.model(ids, batch, cache).cpu()])
        finally:
            h.close()
    assert_same(runs[1], runs[0], tol=1e-4)


def test_store_gives_the_same_model(v3, tmp_path):
    """CPU experts memory-mapped from a `hetero convert` store (all experts, GPU ones never
    read) equal those packed at load (only the CPU's); a store in another format is refused."""
    from hetero.cpu_experts.formats import Format
    from hetero.cpu_experts.store import StoreError, convert

    store = convert(v3, tmp_path / "store", Format.parse("int8"), progress=False)
    packed, mapped = load(v3, "int8"), load(v3, "int8", store=store)
    try:
        assert mapped.engine.layers[1].num_experts == ModelConfig.from_hf(v3).n_routed_experts
        assert_same(run(mapped.model, mapped.model), run(packed.model, packed.model), tol=1e-6)
    finally:
        packed.close()
        mapped.close()
    with pytest.raises(StoreError, match="int4"):
        load(v3, "int4", store=store)


def test_default_placement_when_the_model_does_not_fit_the_gpu(v3):
    """Without a placement file the whole model goes to the device if it fits; on a GPU too
    small for it, the default placement puts the routed experts on the CPU."""
    from hetero.plan import GIB
    from hetero.sched.runtime import choose_placement

    config = ModelConfig.from_hf(v3)
    dtype = torch.bfloat16
    p, plan, hybrid = choose_placement(config, None, None, True, 80 * GIB, 64 * GIB, dtype)
    assert not hybrid and plan.fits and p.experts(1).gpu_experts == tuple(range(16))
    tight = int(1.5 * GIB + plan.gpu_weight_bytes // 2)  # the reserve and half the weights
    p, plan, hybrid = choose_placement(config, None, None, True, tight, 64 * GIB, dtype)
    assert hybrid and p.source == "<default>" and len(p.experts(1).gpu_experts) < 16
    _, plan, hybrid = choose_placement(config, None, None, False, tight, tight, dtype)
    assert not hybrid and not plan.fits  # on the CPU nothing moves: the plan's check refuses


def test_streaming_starts_later_where_the_engine_uses_amx_tiles():
    """Long prefills stream the CPU's experts to the GPU from a length that depends on whether
    the engine computes that layer's busy experts on AMX tiles (faster than streaming at 1024
    tokens), which needs both the CPU and an int4/int8 layer."""
    from hetero.cpu_experts import amx
    from hetero.sched.runtime import default_stream_min_tokens

    assert default_stream_min_tokens(True) > 1024 > default_stream_min_tokens(False)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(2, 128, 256, generator=g) for _ in range(2)]
    down = torch.randn(2, 256, 128, generator=g)
    layers = {spec: pack_experts(*w, down, Format.parse(spec)) for spec in ("int4", "bf16")}
    eng = CPUExperts({0: layers["int4"], 1: layers["bf16"]}, EngineConfig(threads=1))
    try:
        assert eng.uses_amx(0) == amx.has_amx() and not eng.uses_amx(1)
    finally:
        eng.close()
