"""The batched sampler (hetero.engine.sampler) against its per-row reference, each parameter
against a direct computation, and seeded draws against batch position and the distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hetero.engine.params import SamplingParams
from hetero.engine.sampler import (
    SamplingBatch,
    apply_penalties,
    filter_probs,
    hash_uniforms,
    reference_sample,
    sample,
)


def _batch(params, V, seeds=None, steps=None, prompt=None, output=None, device="cpu"):
    B = len(params)
    seeds = [0] * B if seeds is None else seeds
    steps = [0] * B if steps is None else steps
    prompt = [[] for _ in range(B)] if prompt is None else prompt
    output = [[] for _ in range(B)] if output is None else output
    return SamplingBatch.build(params, seeds, steps, prompt, output, V, device)


def _draws(logits, params, N, seed=1234):
    """[N] tokens: one seeded request's first N steps, drawn as N rows of one batch."""
    V = logits.shape[-1]
    batch = _batch([params] * N, V, seeds=[seed] * N, steps=list(range(N)))
    return sample(logits.expand(N, V), batch).tokens


def _random_params(rng: random.Random, V: int) -> SamplingParams:
    n_bias = rng.choice([0, 0, 3])
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 0, 1, 5, V // 3, V + 10]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -0.4]),
        frequency_penalty=rng.choice([0.0, 0.3, -0.2]),
        logit_bias=tuple((t, rng.uniform(-5, 5)) for t in rng.sample(range(V), n_bias)),
        logprobs=rng.choice([None, None, 0, 3, 5]),
    )


def _random_case(seed: int, B: int, V: int):
    rng = random.Random(seed)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3
    params = [_random_params(rng, V) for _ in range(B)]
    seeds = [rng.randrange(2**63) for _ in range(B)]
    prompt = [[rng.randrange(V) for _ in range(rng.randrange(20))] for _ in range(B)]
    output = [[rng.randrange(V) for _ in range(rng.randrange(20))] for _ in range(B)]
    steps = [len(o) for o in output]
    return logits, params, seeds, steps, prompt, output


def _splitmix_uniform(seed: int, step: int, v: int) -> float:
    """hash_uniforms in Python's unbounded ints, masked to 64 bits by hand."""
    M, G = 2**64, 0x9E3779B97F4A7C15

    def mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % M
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % M
        return z ^ (z >> 31)

    row = mix((mix((seed + G) % M) + step * G) % M)
    return ((mix((row + (v + 1) * G) % M) >> 12) + 0.5) / 2**52


def test_hash_uniforms_match_python_splitmix64():
    seeds, steps = [0, 1, 2**63 - 1, 12345678901234, 7], [0, 7, 2**40, 3, 2**62]
    u = hash_uniforms(torch.tensor(seeds), torch.tensor(steps), 50)  # [5, 50]
    want = [[_splitmix_uniform(s, t, v) for v in range(50)] for s, t in zip(seeds, steps)]
    assert u.tolist() == want
    assert 0 < u.min() and u.max() < 1


@pytest.mark.parametrize("B, V, seed", [(16, 300, 0), (16, 300, 1), (9, 1000, 2), (9, 1000, 3)])
def test_batched_matches_reference(B, V, seed):
    logits, params, seeds, steps, prompt, output = _random_case(seed, B, V)
    got = sample(logits, SamplingBatch.build(params, seeds, steps, prompt, output, V, "cpu"))
    want = reference_sample(logits, params, seeds, steps, prompt, output)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
    assert got.top_ids.tolist() == want.top_ids.tolist()
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_matches_reference_at_deepseek_vocab(seed):
    V = 129280
    logits, _, seeds, steps, prompt, output = _random_case(seed, 2, V)
    params = [
        SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.1, logprobs=2),
        SamplingParams(temperature=1.0, top_k=40, min_p=0.01, frequency_penalty=0.5),
    ]
    got = sample(logits, SamplingBatch.build(params, seeds, steps, prompt, output, V, "cpu"))
    want = reference_sample(logits, params, seeds, steps, prompt, output)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
    assert got.top_ids.shape == (2, 2)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0.0, top_p=0.3, top_k=7, min_p=0.5)] * 8
    assert sample(logits, _batch(greedy, 500)).tokens.tolist() == logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=1.7, top_k=1)] * 8
    batch = _batch(hot, 500, seeds=list(range(8)), steps=[3 * i for i in range(8)])
    assert sample(logits, batch).tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_row_ignores_its_batch():
    V, steps = 1000, 12
    gen = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=99)
    for step in range(steps):
        row = torch.randn(1, V, generator=gen) * 2
        alone = sample(row, _batch([target], V, seeds=[99], steps=[step])).tokens.item()
        for pos in (0, 3, 7):
            logits = torch.randn(8, V, generator=gen) * 2
            logits[pos] = row[0]
            params = [_random_params(rng, V) for _ in range(8)]
            seeds = [rng.randrange(2**63) for _ in range(8)]
            step_of = [rng.randrange(50) for _ in range(8)]
            params[pos], seeds[pos], step_of[pos] = target, 99, step
            assert sample(logits, _batch(params, V, seeds, step_of)).tokens[pos].item() == alone


def test_different_seeds_and_steps_draw_differently():
    logits = torch.zeros(1, 1000)  # uniform: two streams agree on a draw with chance 1/1000
    one = _draws(logits, SamplingParams(), 100, seed=1)
    two = _draws(logits, SamplingParams(), 100, seed=2)
    assert (one != two).sum() >= 95
    assert len(set(one.tolist())) >= 90  # and successive steps of one seed differ too


def _expected_probs(logits: list[float], T: float, top_k: int, top_p: float, min_p: float):
    """The filtered, renormalized distribution, in float64 by the definitions."""
    p = [math.exp(x / T) for x in logits]
    p = [x / sum(p) for x in p]
    order = sorted(range(len(p)), key=lambda v: -p[v])
    kept = order[:top_k] if top_k else order
    mass, reached = sum(p[v] for v in kept), []
    for v in kept:  # the smallest prefix whose share of what top_k kept reaches top_p
        reached.append(v)
        if sum(p[w] for w in reached) >= top_p * mass:
            break
    kept = [v for v in reached if p[v] >= min_p * p[order[0]]]
    return [p[v] / sum(p[w] for w in kept) if v in kept else 0.0 for v in range(len(p))]


@pytest.mark.parametrize(
    "T, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 4, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2),
     (1.0, 4, 0.9, 0.1)],
)  # fmt: skip
def test_empirical_distribution(T, top_k, top_p, min_p):
    logits, N = [2.0, 1.5, 1.0, 0.2, -0.5], 20000
    params = SamplingParams(temperature=T, top_k=top_k, top_p=top_p, min_p=min_p)
    counts = torch.bincount(_draws(torch.tensor([logits]), params, N), minlength=5).tolist()
    expected = [N * q for q in _expected_probs(logits, T, top_k, top_p, min_p)]
    assert [c for c, e in zip(counts, expected) if e == 0] == [0] * expected.count(0.0)
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected) if e > 0)
    assert chi2 < 25, (counts, expected)  # 4 degrees of freedom at most: p < 1e-4


def test_top_k_draws_only_the_k_most_likely():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(1))
    drawn = _draws(logits, SamplingParams(temperature=3.0, top_k=7), 3000)
    assert set(drawn.tolist()) == set(logits[0].topk(7).indices.tolist())


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.6, 0.9])
def test_top_p_keeps_the_smallest_set_reaching_it(top_p):
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, -1)
    want = _expected_probs(logits[0].tolist(), 1.0, 0, top_p, 0.0)
    one = torch.ones(1, dtype=torch.float32)
    kept = filter_probs(probs, torch.tensor([10]), one * top_p, one * 0) > 0
    assert kept[0].tolist() == [q > 0 for q in want]
    drawn = _draws(logits, SamplingParams(top_p=top_p), 4000)
    assert set(drawn.tolist()) == {v for v, q in enumerate(want) if q > 0}
    assert logits.argmax().item() in drawn.tolist()  # the most likely token is always kept


def test_top_p_counts_mass_within_top_k():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])

    def kept(top_k, top_p):
        one = torch.ones(1)
        return (filter_probs(probs, torch.tensor([top_k]), one * top_p, one * 0) > 0)[0].tolist()

    assert kept(4, 0.35) == [True, False, False, False]
    assert kept(4, 0.56) == [True, True, False, False]  # 0.4 of all falls short of 0.56
    assert kept(2, 0.56) == [True, False, False, False]  # but 0.4 / 0.7 of the top 2 reaches it
    assert kept(2, 0.58) == [True, True, False, False]
    assert kept(3, 0.95) == [True, True, True, False]


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.8])
def test_min_p_drops_below_its_share_of_the_top(min_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(logits, -1)
    want = (probs >= min_p * probs.max())[0]
    kept = filter_probs(probs, torch.tensor([30]), torch.ones(1), torch.tensor([min_p])) > 0
    assert kept[0].tolist() == want.tolist()
    drawn = _draws(logits, SamplingParams(min_p=min_p), 2000)
    assert set(drawn.tolist()) <= set(want.nonzero()[:, 0].tolist())


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[3.0, -2.0, 1.0, -1.0, 0.5]] * 2)
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=0.5)]
    batch = _batch(params, 5, prompt=[[0], [0, 3]], output=[[1, 1], [4]])
    want = torch.tensor([[1.5, -4.0, 1.0, -1.0, 0.5], [6.0, -2.0, 1.0, -0.5, 1.0]])
    torch.testing.assert_close(apply_penalties(logits, batch), want, atol=0, rtol=0)
    greedy = [SamplingParams(temperature=0, repetition_penalty=1.5)]
    both = torch.tensor([[2.0, 1.5], [-1.0, -1.2]])
    assert sample(both[:1], _batch(greedy, 2, prompt=[[0]])).tokens.item() == 1
    assert sample(both[1:], _batch(greedy, 2, output=[[0]])).tokens.item() == 1


def test_presence_and_frequency_penalize_output_tokens_only():
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    prompt, output = [[0, 1, 1, 5], [0, 1]], [[1, 2, 2, 2], [2]]
    batch = _batch(params, 6, prompt=prompt, output=output)
    got = apply_penalties(torch.zeros(2, 6), batch)
    want = torch.tensor([[0.0, -0.75, -1.25, 0.0, 0.0, 0.0], [0.0] * 6])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_plain_params_build_no_penalty_tensors():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=5)]
    batch = _batch(params, 100, prompt=[[1, 2], [3]], output=[[4], [5]])
    assert batch.seen is None and batch.output_counts is None and batch.logit_bias is None
    assert batch.all_greedy and not batch.filtered and batch.max_logprobs is None
    out = sample(torch.randn(2, 100), batch)
    assert out.top_ids is None and out.top_logprobs is None


def test_logit_bias_forces_and_bans():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(4)) * 3
    forced = _draws(logits, SamplingParams(logit_bias=((17, 100.0),)), 200)
    assert forced.tolist() == [17] * 200
    top = logits.argmax().item()
    banned = _draws(logits, SamplingParams(logit_bias={top: -100.0}), 2000)
    assert top not in banned.tolist()
    greedy = SamplingParams(temperature=0, logit_bias={top: -100.0})
    assert sample(logits, _batch([greedy], 1000)).tokens.item() == logits[0].topk(2).indices[1]


def test_logprobs_are_of_the_raw_logits():
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(6)) * 2
    params = [
        SamplingParams(temperature=0.5, logit_bias={3: 5.0}, repetition_penalty=1.4, logprobs=3),
        SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0),
        SamplingParams(top_p=0.7),
    ]
    batch = _batch(params, 400, prompt=[[1, 2], [3], []], output=[[5], [6, 6], [7]])
    out = sample(logits, batch)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.tokens[:, None])[:, 0])
    values, ids = raw.topk(3, dim=-1)
    assert out.top_ids.tolist() == ids.tolist()  # every row gets the batch's widest n
    torch.testing.assert_close(out.top_logprobs, values)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cuda_draws_match_cpu(seed):
    logits, params, seeds, steps, prompt, output = _random_case(seed, 16, 1000)
    cpu = sample(logits, SamplingBatch.build(params, seeds, steps, prompt, output, 1000, "cpu"))
    gpu_batch = SamplingBatch.build(params, seeds, steps, prompt, output, 1000, "cuda")
    gpu = sample(logits.cuda(), gpu_batch)
    assert gpu.tokens.tolist() == cpu.tokens.tolist()
    torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-5, rtol=1e-5)
    want = reference_sample(logits.cuda(), params, seeds, steps, prompt, output)
    assert gpu.tokens.tolist() == want.tokens.tolist()
