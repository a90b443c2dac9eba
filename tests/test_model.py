"""Our model against transformers' own DeepSeek V2/V3 on the same checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
    DynamicCache,
    FineGrainedFP8Config,
)

from hetero.config import ModelConfig
from hetero.generate import SamplingParams, generate
from hetero.loader import load_model
from hetero.model import ForwardBatch
from hetero.model.moe import RoutedRun, finish
from hetero.testing import fp8_block_dequantize

STEPS = 32
TOL = 1e-4
PROMPT_LENS = (5, 13, 1, 9)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def load_reference(path, tmp_path, own_fp8: bool):
    """transformers' model on the same weights. Its own FP8 dequantization derives the block from
    the scale grid, so it breaks on partial edge blocks (DeepSeek-V3 has them: kv_a_proj_with_mqa
    is 576 rows); for such checkpoints the simple block reference of hetero.testing first writes
    an fp32 copy. `own_fp8`: a checkpoint without edge blocks, dequantized by transformers."""
    config = ModelConfig.from_hf(path)
    cls = DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    if own_fp8:
        fp8 = FineGrainedFP8Config(dequantize=True)
        model = cls.from_pretrained(path, dtype=torch.float32, quantization_config=fp8)
        return model.float().eval()  # transformers leaves the non-FP8 tensors in bf16
    if config.fp8_block:
        path = dequantized_copy(path, tmp_path)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def dequantized_copy(path: Path, out: Path) -> Path:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        weight = name.removesuffix("_scale_inv")
        tensors[weight] = fp8_block_dequantize(tensors[weight], tensors.pop(name))
    save_file({n: t.float().contiguous() for n, t in tensors.items()}, out / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@torch.no_grad()
def reference_run(ref, prompt: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy decoding with transformers' own cache: prefill logits, then one logits row a step."""
    out = ref(
        input_ids=torch.tensor([prompt]),
        past_key_values=DynamicCache(config=ref.config),
        use_cache=True,
    )
    logits, tokens = [out.logits[0]], []
    for _ in range(STEPS):
        tokens.append(int(logits[-1][-1].argmax()))
        out = ref(
            input_ids=torch.tensor([[tokens[-1]]]),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        logits.append(out.logits[0])
    return logits, tokens


def our_run(model, prompts, forced):
    """Batched prefill of all prompts, then STEPS batched decode steps fed the given tokens."""
    return our_run_on(model, prompts, forced, "cpu")


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_v3_aligned", "tiny_v2", "hf_v3"])
def checkpoint(request, tmp_path_factory):
    path = request.getfixturevalue(request.param)
    vocab = ModelConfig.from_hf(path).vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    own_fp8 = request.param == "tiny_v3_aligned"
    ref = load_reference(path, tmp_path_factory.mktemp("reference"), own_fp8)
    runs = [reference_run(ref, p) for p in prompts]
    return path, prompts, runs


@pytest.mark.parametrize("attention", ["absorbed", "naive"])
def test_logits_match_transformers(checkpoint, attention):
    path, prompts, runs = checkpoint
    model = load_model(path, dtype=torch.float32, attention=attention, progress=False)
    prefill, steps = our_run(model, prompts, [tokens for _, tokens in runs])
    for i, (ref_logits, _) in enumerate(runs):
        assert rel_err(prefill[i], ref_logits[0]) < TOL, f"prompt {i} prefill"
        for s in range(STEPS):
            assert rel_err(steps[s][i], ref_logits[s + 1][0]) < TOL, f"prompt {i} step {s}"


@pytest.mark.parametrize("prefill_chunk", [0, 4])
def test_greedy_generation_matches_transformers(checkpoint, prefill_chunk):
    """Also with prompts fed 4 tokens a step (chunked prefill attends to the cached part)."""
    path, prompts, runs = checkpoint
    model = load_model(path, dtype=torch.float32, progress=False)
    outputs = generate(model, prompts, SamplingParams(max_tokens=STEPS), prefill_chunk)
    assert outputs == [tokens for _, tokens in runs]


def test_naive_and_absorbed_agree(tiny_v3):
    prompts = [list(range(3, 3 + n)) for n in PROMPT_LENS]
    forced = [[7] * STEPS for _ in prompts]
    runs = [
        our_run(
            load_model(tiny_v3, dtype=torch.float32, attention=a, progress=False), prompts, forced
        )
        for a in ("naive", "absorbed")
    ]
    (pre_n, steps_n), (pre_a, steps_a) = runs
    for a, b in zip(pre_n + steps_n, pre_a + steps_a):
        assert rel_err(a, b) < TOL


def test_batch_equals_single_sequences(tiny_v2):
    """A prompt's logits do not depend on the other sequences of its batch or on its cache slot."""
    model = load_model(tiny_v2, dtype=torch.float32, progress=False)
    prompts = [list(range(10, 10 + n)) for n in PROMPT_LENS]
    batched, _ = our_run(model, prompts, [[1] * STEPS] * len(prompts))
    for i, p in enumerate(prompts):
        alone, _ = our_run(model, [p], [[1] * STEPS])
        assert rel_err(alone[0], batched[i]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["absorbed", "naive"])
def test_cuda_matches_cpu(tiny_v3, attention):
    """The same model code on CUDA: fp32 equals the CPU run; bf16 runs and stays near it (a
    random 3-layer model amplifies bf16 rounding: 15% measured on the H100)."""
    prompts = [list(range(3, 3 + n)) for n in PROMPT_LENS]
    forced = [[7] * STEPS for _ in prompts]
    cpu = our_run(
        load_model(tiny_v3, dtype=torch.float32, attention=attention, progress=False),
        prompts,
        forced,
    )
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.3)):
        model = load_model(tiny_v3, device="cuda", dtype=dtype, attention=attention, progress=False)
        gpu = our_run_on(model, prompts, forced, "cuda")
        for a, b in zip(cpu[0] + cpu[1], gpu[0] + gpu[1]):
            assert rel_err(b.cpu(), a) < tol, dtype


def our_run_on(model, prompts, forced, device):
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + STEPS + 1)
    lens = [len(p) for p in prompts]
    batch = ForwardBatch.build(list(range(len(prompts))), lens, lens, device)
    flat = model(torch.tensor([t for p in prompts for t in p], device=device), batch, cache)
    prefill, steps = list(flat.split(lens)), []
    for s in range(STEPS):
        lens = [n + 1 for n in lens]
        batch = ForwardBatch.build(list(range(len(prompts))), [1] * len(prompts), lens, device)
        steps.append(model(torch.tensor([f[s] for f in forced], device=device), batch, cache))
    return prefill, steps


def test_finish_sums_what_is_ready_before_waiting_for_the_routed_experts():
    """routed + (shared + deferred): the previous layer's deferred experts are taken (and
    added to the shared ones) before this layer's routed sum is waited for."""
    calls = []

    class Deferred:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def result(self):
            calls.append(self.name)
            return self.value

    routed = Deferred("routed", torch.tensor([1.0, 2.0]))
    later = Deferred("this layer's deferred", torch.zeros(2))
    shared, pending = (
        torch.tensor([10.0, 20.0]),
        Deferred("previous layer's deferred", torch.tensor([100.0, 200.0])),
    )
    y, deferred = finish(RoutedRun(routed.result, later), shared, pending)
    assert calls == ["previous layer's deferred", "routed"] and deferred is later
    assert torch.equal(y, torch.tensor([111.0, 222.0]))
    y, _ = finish(RoutedRun(routed.result), None, None)
    assert torch.equal(y, torch.tensor([1.0, 2.0]))
