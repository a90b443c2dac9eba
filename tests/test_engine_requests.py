"""The engine at the level of one request: limits at submission, stop tokens and strings,
logprobs, seeded sampling, streamed text, deterministic mode (shares test_engine's helpers)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from test_engine import (
    DEMO,
    EOS,
    Demo,
    assert_pool_whole,
    demo,
    drain,
    greedy,
    text,
    tokens,
)

from hetero.engine.engine import RequestError
from hetero.engine.params import SamplingParams
from hetero.model import ForwardBatch

pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")
__all__ = ["demo"]  # the module-scoped fixture, imported for this file's tests


def numbers(message: str) -> set[str]:
    return set(re.findall(r"-?\d+(?:\.\d+)?", message))


@pytest.mark.parametrize(
    "config, prompt_len, max_tokens, named",
    [
        (dict(max_model_len=64, kv_cache_tokens=1024), 57, 8, {"64", "57", "8", "65"}),
        (dict(kv_cache_tokens=128), 100, 29, {"128", "100", "29", "129"}),
        (dict(kv_cache_tokens=128), 1, 128, {"128", "1", "129"}),
    ],
    ids=["context", "pool", "pool-by-max-tokens"],
)
def test_too_long_requests_are_refused_with_the_numbers(
    demo, config, prompt_len, max_tokens, named
):
    engine = demo.engine(page_size=16, **config)
    prompt = (demo.ids * 2)[:prompt_len]
    with pytest.raises(RequestError) as e:
        engine.add_request(prompt, greedy(max_tokens))
    assert named <= numbers(str(e.value)), str(e.value)
    assert not engine.has_work and not engine.requests
    # one token less fits
    engine.add_request(prompt, greedy(max_tokens - 1))


def test_a_request_that_fills_the_whole_pool_is_served(demo):
    engine = demo.engine(page_size=16, kv_cache_tokens=128)
    free = engine.pool.num_free
    prompt = (demo.ids * 2)[:120]
    rid = engine.add_request(prompt, greedy(8))
    outs = drain(engine)
    assert len(tokens(outs[rid])) == 8 and outs[rid][-1].finish_reason == "length"
    assert_pool_whole(engine, free)


@pytest.mark.parametrize(
    "prompt, params, named",
    [
        ([], greedy(), ["empty"]),
        ([5, 8192, 7], greedy(), ["8192"]),
        ([5, -1], greedy(), ["-1"]),
        ([5], greedy(max_tokens=0), ["max_tokens", "0"]),
        ([5], SamplingParams(temperature=-0.5), ["temperature", "-0.5"]),
        ([5], SamplingParams(top_p=0.0), ["top_p", "0.0"]),
        ([5], SamplingParams(top_k=-3), ["top_k", "-3"]),
        ([5], SamplingParams(min_p=1.5), ["min_p", "1.5"]),
        ([5], SamplingParams(logprobs=21), ["logprobs", "21", "20"]),
        ([5], SamplingParams(seed=-1), ["seed", "-1"]),
        ([5], SamplingParams(stop_token_ids=(9000,)), ["stop_token_ids", "9000", "8192"]),
        ([5], SamplingParams(logit_bias={8192: 1.0}), ["logit_bias", "8192"]),
        ([5], SamplingParams(logit_bias={3: 101.0}), ["logit_bias", "101"]),
        ([5], SamplingParams(stop=("",)), ["stop"]),
        ([5], SamplingParams(repetition_penalty=0), ["repetition_penalty", "0"]),
        ([5], SamplingParams(presence_penalty=3), ["presence_penalty", "3"]),
    ],
)
def test_bad_requests_are_refused_at_submission(demo, prompt, params, named):
    engine = demo.engine(page_size=16, kv_cache_tokens=256)
    with pytest.raises(RequestError) as e:
        engine.add_request(prompt, params, request_id="bad")
    for word in named:
        assert word in str(e.value), str(e.value)
    assert not engine.has_work and not engine.requests
    assert engine.add_request([5, 6], greedy(), request_id="bad") == "bad"  # the id stayed free
    with pytest.raises(RequestError, match="'bad'"):
        engine.add_request([5, 6], greedy(), request_id="bad")


# -- stops, lengths, logprobs ----------------------------------------------------------------


def test_stop_tokens_eos_and_length(demo):
    prompt = demo.ids[10:30]
    r = demo.reference([prompt], 8)[0]
    eos, stop = r[2], r[4]
    engine = demo.engine(eos_ids=(eos,), page_size=16, kv_cache_tokens=512)
    free = engine.pool.num_free
    at_eos = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
    past_eos = engine.add_request(prompt, greedy(8))
    at_stop = engine.add_request(prompt, greedy(8, stop_token_ids=(stop,)))
    short = engine.add_request(prompt, greedy(5))
    outs = drain(engine)

    assert tokens(outs[at_eos]) == r[: r.index(eos) + 1]
    assert outs[at_eos][-1].finish_reason == "stop"
    assert tokens(outs[past_eos]) == r and outs[past_eos][-1].finish_reason == "length"
    assert tokens(outs[at_stop]) == r[: r.index(stop) + 1]
    assert outs[at_stop][-1].finish_reason == "stop"
    assert tokens(outs[short]) == r[:5] and outs[short][-1].finish_reason == "length"
    assert outs[short][-1].usage.completion_tokens == 5
    for rid in (at_eos, past_eos, at_stop, short):
        assert outs[rid][-1].stop is None
    assert_pool_whole(engine, free)


def test_the_models_own_eos_ends_the_request(demo):
    prompt = demo.tok.encode("x = 1\n", add_special_tokens=False)
    r = demo.reference([prompt], 16)[0]
    assert EOS in r[:-1], "the demo model should end this snippet within 16 tokens"
    engine = demo.engine(page_size=16, kv_cache_tokens=512)
    free = engine.pool.num_free
    stops = engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0))
    goes_on = engine.add_request(prompt, greedy(16))
    outs = drain(engine)
    assert tokens(outs[stops]) == r[: r.index(EOS) + 1]
    assert outs[stops][-1].finish_reason == "stop"
    assert text(outs[stops]) == demo.text(r[: r.index(EOS)])
    assert tokens(outs[goes_on]) == r and outs[goes_on][-1].finish_reason == "length"
    assert text(outs[goes_on]) == demo.text(r)  # the eos token shows no text
    assert_pool_whole(engine, free)


def stop_case(demo: Demo, r: list[int], spanned: int) -> tuple[str, int, int]:
    """A stop string over `spanned` tokens of r's text, found nowhere earlier: -> (the stop
    string, where it starts in the text, how many tokens it takes to complete it). It runs from
    the last character of r[:i]'s text to the first one that token r[k] adds."""
    full = demo.text(r)
    for i in range(1, len(r) - spanned + 2):
        k = i + spanned - 2
        before, through, tail = demo.text(r[:i]), demo.text(r[:k]), demo.text(r[: k + 1])
        if not before or len(tail) <= len(through) or not full.startswith(tail):
            continue
        if spanned > 2 and len(through) <= len(before):
            continue  # the tokens in between add no text: fewer tokens spanned
        stop = full[len(before) - 1 : len(through) + 1]
        if full.find(stop) == len(before) - 1:
            return stop, len(before) - 1, k + 1
    raise AssertionError(f"no stop string over {spanned} tokens in {full!r}")


@pytest.mark.parametrize("spanned, at_last_token", [(2, False), (3, False), (2, True)])
def test_stop_strings_across_tokens(demo, spanned, at_last_token):
    prompt = demo.ids[10:30]
    r = demo.reference([prompt], 12)[0]
    stop, where, n = stop_case(demo, r, spanned)
    max_tokens = n if at_last_token else 12
    engine = demo.engine(page_size=16, kv_cache_tokens=512)
    free = engine.pool.num_free
    rid = engine.add_request(prompt, greedy(max_tokens, stop=("never there", stop)))
    outs = drain(engine)[rid]

    assert text(outs) == demo.text(r)[:where]
    assert all(stop not in o.text for o in outs)
    assert tokens(outs) == r[:n]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].stop == stop
    assert_pool_whole(engine, free)


def reference_logprobs(demo: Demo, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V] log_softmax of the logits that chose each output token, from one
    prefill of prompt + output in the contiguous cache."""
    ids = prompt + output[:-1]
    T = len(ids)
    logits = demo.model(torch.tensor(ids), ForwardBatch.build([0], [T], [T]),
                        demo.model.new_cache(1, T))  # fmt: skip
    return torch.log_softmax(logits[len(prompt) - 1 :].float(), dim=-1)


def test_logprobs_are_the_models(demo):
    prompt = demo.ids[50:70]
    engine = demo.engine(page_size=16, kv_cache_tokens=512, max_num_batched_tokens=32)
    sampled = SamplingParams(max_tokens=4, temperature=0.7, seed=3, logprobs=3)
    asked = {  # request id -> (top logprobs asked, greedy)
        engine.add_request(prompt, greedy(4, logprobs=5)): (5, True),
        engine.add_request(prompt, greedy(4, logprobs=0)): (0, True),
        engine.add_request(prompt[3:], sampled): (3, False),
        engine.add_request(prompt, greedy(4)): (None, True),
    }
    prompts = {rid: engine.requests[rid].tokens[:] for rid in asked}
    outs = drain(engine)

    for rid, (n, is_greedy) in asked.items():
        if n is None:
            assert all(o.logprobs is None for o in outs[rid])
            continue
        out_tokens = tokens(outs[rid])
        assert len(out_tokens) == 4
        ref = reference_logprobs(demo, prompts[rid], out_tokens)
        for j, (o, token) in enumerate(zip(outs[rid], out_tokens)):
            (lp,) = o.logprobs
            assert lp.token == token
            assert abs(lp.logprob - ref[j, token].item()) < 1e-4, (rid, j)
            assert len(lp.top) == n
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            if n:
                best = ref[j].topk(n)
                assert [t for t, _ in lp.top] == best.indices.tolist()
                assert torch.allclose(torch.tensor(values), best.values, atol=1e-4)
                if is_greedy:
                    assert lp.top[0][0] == token


# -- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_ignores_the_batch(demo):
    prompt = demo.ids[40:52]
    seeded = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=1234)

    alone = demo.engine(page_size=16, kv_cache_tokens=512)
    rids = {seed: alone.add_request(prompt, replace(seeded, seed=seed)) for seed in (1234, 1, 2)}
    outs = drain(alone)
    by_seed = {seed: tokens(outs[rid]) for seed, rid in rids.items()}
    assert by_seed[1] != by_seed[1234] or by_seed[2] != by_seed[1234]
    assert by_seed[1] != by_seed[2]

    crowd = demo.engine(page_size=8, kv_cache_tokens=1024, max_num_batched_tokens=24)
    others = [
        SamplingParams(max_tokens=8, temperature=1.0),
        SamplingParams(max_tokens=6, temperature=1.2, top_k=20),
        greedy(10),
        SamplingParams(max_tokens=8, temperature=0.9, repetition_penalty=1.3, seed=7),
        SamplingParams(max_tokens=5, temperature=0.5, min_p=0.1, presence_penalty=0.5),
        SamplingParams(max_tokens=9, temperature=1.0, logit_bias={13: 5.0}),
        SamplingParams(max_tokens=7, temperature=0.7, top_p=0.5, frequency_penalty=1.0),
    ]
    rid = None
    for i, params in enumerate(others):
        crowd.add_request(demo.ids[7 * i : 7 * i + 5 + 3 * i], params)
        if i == 2:
            rid = crowd.add_request(prompt, seeded)
    outs = drain(crowd)
    assert len(outs) == 8
    assert tokens(outs[rid]) == by_seed[1234]


def test_streamed_text_is_the_decoded_output(demo):
    tok = demo.tok
    prompts = [tok.encode("print('\U0001f642", add_special_tokens=False), demo.ids[120:140]]
    engine = demo.engine(page_size=16, kv_cache_tokens=512)
    rids = [engine.add_request(p, greedy(12)) for p in prompts]
    outs = drain(engine)
    for rid in rids:
        out_tokens = tokens(outs[rid])
        assert text(outs[rid]) == demo.text(out_tokens)
        assert all("\ufffd" not in o.text for o in outs[rid])
    # the first prompt's output really splits characters over tokens
    emoji = tokens(outs[rids[0]])
    assert any("\ufffd" in tok.decode([t]) for t in emoji)
    assert any(ord(c) > 127 for c in text(outs[rids[0]]))


def test_deterministic_mode_gives_a_request_the_same_logits_in_any_company(demo):
    """ServingConfig.deterministic: each request its own forward pass, prompts in fixed chunks;
    two prompts longer than the chunk make steps in which no request samples."""
    prompts = [demo.ids[0:40], demo.ids[50:90]]
    config = dict(page_size=16, kv_cache_tokens=1024, max_num_batched_tokens=64,
                  deterministic=True, deterministic_chunk=16)  # fmt: skip
    alone = []
    for prompt in prompts:
        engine = demo.engine(**config)
        rid = engine.add_request(prompt, greedy(4, logprobs=0))
        alone.append(drain(engine)[rid])
    engine = demo.engine(**config)
    free = engine.pool.num_free
    rids = [engine.add_request(p, greedy(4, logprobs=0)) for p in prompts]
    outs = drain(engine)
    for rid, by_itself, expected in zip(rids, alone, demo.reference(prompts, 4)):
        assert tokens(outs[rid]) == tokens(by_itself) == expected
        logprobs = [o.logprobs[0].logprob for o in outs[rid]]
        assert logprobs == [o.logprobs[0].logprob for o in by_itself]
    assert_pool_whole(engine, free)


@pytest.mark.parametrize("field", ["page_size", "kv_cache_tokens", "max_num_batched_tokens"])
def test_serving_config_refuses_sizes_below_one(field):
    from hetero.engine.engine import ServingConfig

    with pytest.raises(ValueError, match=f"ServingConfig.{field} = 0: must be >= 1"):
        ServingConfig(**{field: 0})
    assert ServingConfig(**{field: 1}).num_pages >= 2
