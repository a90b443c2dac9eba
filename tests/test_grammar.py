"""Structured output (hetero/engine/grammar.py) on the tiny random-weight checkpoint.

Random weights make garbage, which is what makes the constraint visible: whatever comes out
must still parse and validate. Such a model rarely picks the one token that closes a string or
ends a list of calls among hundreds that go on, so some tests nudge it with a logit_bias on
that token (applied before the mask; the mask alone decides what is allowed)."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict

import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.engine.engine import Engine, RequestError, ServingConfig
from hetero.engine.grammar import Grammars, GrammarSpec, TokenMask, apply_mask
from hetero.engine.params import SamplingParams
from hetero.engine.sampler import SamplingBatch, sample
from hetero.loader import load_model
from hetero.server.toolcalls import (
    ARGS_CLOSE,
    ARGS_OPEN,
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
)
from hetero.testing.tokenizer import EOS, EOS_ID

GrammarMatcher = pytest.importorskip("xgrammar").GrammarMatcher  # a server extra (setup.sh)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {k: {"type": "integer", "minimum": -100, "maximum": 100} for k in "ab"},
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
LIST = r"\[[0-9]{3}(,[0-9]{3}){5,8}\]"  # a regex whose output is short and can't restart
MODES = [dict(temperature=0), dict(temperature=1.0, seed=7)]  # greedy, sampled
MODE_IDS = ["greedy", "sampled"]


class Tiny:
    def __init__(self, path) -> None:
        self.model = load_model(path, dtype=torch.float32, progress=False)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.prompt = self.tok.encode("def f(x):\n    return", add_special_tokens=False)

    def engine(self, **config) -> Engine:
        config = {"page_size": 16, "kv_cache_tokens": 4096, **config}
        return Engine(self.model, self.tok, ServingConfig(**config), eos_ids=(EOS_ID,))

    def bias(self, text: str, value: float = 8.0) -> dict[int, float]:
        return {self.tok.convert_tokens_to_ids(text): value}


@pytest.fixture(scope="module")
def tiny(tiny_v3) -> Tiny:
    return Tiny(tiny_v3)


def run(engine: Engine, requests: dict) -> dict[str, list]:
    """Adds each (prompt, params) under its key and steps until done; -> key: outputs."""
    rids = {key: engine.add_request(prompt, params) for key, (prompt, params) in requests.items()}
    outs = defaultdict(list)
    for _ in range(5000):
        if not engine.has_work:
            return {key: outs[rid] for key, rid in rids.items()}
        for out in engine.step():
            outs[out.request_id].append(out)
    raise AssertionError("the engine did not drain")


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def validate(value, schema: dict, path: str = "$") -> None:
    """The JSON-schema subset these tests use; additional properties are refused, as
    xgrammar's strict mode does."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in the enum"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        assert set(schema.get("required", ())) <= value.keys(), f"{path}: a required key is missing"
        assert value.keys() <= props.keys(), f"{path}: keys {set(value) - set(props)} not allowed"
        for key, item in value.items():
            validate(item, props[key], f"{path}.{key}")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert len(value) <= schema.get("maxLength", len(value)), f"{path}: too long"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: not an integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def parse_tool_calls(text: str) -> list[tuple[str, object]]:
    """DeepSeek-V3's tool-call block -> [(name, arguments)]; AssertionError where it deviates."""
    assert text.startswith(CALLS_BEGIN) and text.endswith(CALLS_END), text
    decoder, pos, calls = json.JSONDecoder(), len(CALLS_BEGIN), []
    while True:
        head = f"{CALL_BEGIN}function{SEP}"
        assert text.startswith(head, pos), text[pos:]
        name_end = text.index(ARGS_OPEN, pos)
        name, pos = text[pos + len(head) : name_end], name_end + len(ARGS_OPEN)
        args, pos = decoder.raw_decode(text, pos)
        assert text.startswith(ARGS_CLOSE + CALL_END, pos), text[pos:]
        pos += len(ARGS_CLOSE + CALL_END)
        calls.append((name, args))
        if pos == len(text) - len(CALLS_END):
            return calls
        assert text[pos] == "\n", text[pos:]
        pos += 1


def finished_by_grammar(outs) -> bool:
    return outs[-1].finish_reason == "stop" and tokens_of(outs)[-1] == EOS_ID


# -- the kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_json_object_outputs_parse_as_an_object(tiny, mode):
    params = SamplingParams(max_tokens=300, grammar=GrammarSpec("json_object"),
                            logit_bias=tiny.bias('"'), **mode)  # fmt: skip
    outs = run(tiny.engine(), {"a": (tiny.prompt, params)})["a"]
    assert finished_by_grammar(outs)
    assert isinstance(json.loads(text_of(outs)), dict)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_json_schema_outputs_validate(tiny, mode):
    params = SamplingParams(max_tokens=300, grammar=GrammarSpec("json_schema", json.dumps(SCHEMA)),
                            **mode)  # fmt: skip
    outs = run(tiny.engine(), {i: (tiny.prompt[i:], params) for i in range(2)})
    for out in outs.values():
        assert finished_by_grammar(out)
        validate(json.loads(text_of(out)), SCHEMA)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_regex_outputs_match(tiny, mode):
    pattern = r"[a-z]{3}-[0-9]{2,4}( (yes|no))?"
    params = SamplingParams(max_tokens=50, grammar=GrammarSpec("regex", pattern), **mode)
    outs = run(tiny.engine(), {i: (tiny.prompt[i:], params) for i in range(4)})
    for out in outs.values():
        assert finished_by_grammar(out)
        assert re.fullmatch(pattern, text_of(out)), text_of(out)


@pytest.mark.parametrize("mode, forced", [(MODES[0], None), (MODES[1], "add")],
                         ids=["greedy-any", "sampled-forced"])  # fmt: skip
def test_tool_calls_match_the_format_and_their_schemas(tiny, mode, forced):
    spec = GrammarSpec("tool_calls", json.dumps({"tools": TOOLS, "name": forced}))
    # "<" begins both the next call and the end of the block: biased, the calls end sooner
    params = SamplingParams(max_tokens=400, grammar=spec, skip_special_tokens=False,
                            logit_bias=tiny.bias("<", 5.0), **mode)  # fmt: skip
    outs = run(tiny.engine(), {i: (tiny.prompt[i:], params) for i in range(2)})
    schemas = {"get_weather": WEATHER, "add": ADD}
    for out in outs.values():
        assert finished_by_grammar(out)
        text = text_of(out).removesuffix(EOS)
        calls = parse_tool_calls(text)
        for name, args in calls:
            assert name == forced or (forced is None and name in schemas), name
            validate(args, schemas[name])


def test_tool_calls_parallel_false_gives_exactly_one_call(tiny):
    spec = GrammarSpec("tool_calls", json.dumps({"tools": TOOLS, "parallel": False}))
    params = SamplingParams(max_tokens=300, grammar=spec, skip_special_tokens=False,
                            temperature=1.0, seed=3)  # fmt: skip
    outs = run(tiny.engine(), {i: (tiny.prompt[i:], params) for i in range(3)})
    for out in outs.values():
        assert finished_by_grammar(out)
        assert len(parse_tool_calls(text_of(out).removesuffix(EOS))) == 1


@pytest.mark.parametrize("tokenizer", ["tiny", "demo"])
def test_tool_markers_match_as_one_token_or_spelled_in_pieces(tiny, tokenizer):
    """The tiny tokenizer has the format's markers as special tokens, the demo one spells them
    in byte pieces: the grammar, on bytes, takes a valid block either way and ends at eos."""
    if tokenizer == "demo" and demo_dir() is None:
        pytest.skip("the demo model is not in hetero/demo/")
    tok = tiny.tok if tokenizer == "tiny" else AutoTokenizer.from_pretrained(demo_dir())
    grammars = Grammars(tok, len(tok), (EOS_ID,))
    spec = GrammarSpec("tool_calls", json.dumps({"tools": TOOLS}))
    calls = [("add", '{"a": 1, "b": -2}'), ("get_weather", '{"city": "Oslo", "unit": "celsius"}')]
    block = "\n".join(f"{CALL_BEGIN}function{SEP}{n}{ARGS_OPEN}{a}{ARGS_CLOSE}{CALL_END}"
                      for n, a in calls)  # fmt: skip
    ids = tok.encode(CALLS_BEGIN + block + CALLS_END, add_special_tokens=False)
    assert (tok.convert_tokens_to_ids(CALLS_BEGIN) in ids) == (tokenizer == "tiny")
    matcher = grammars.matcher(spec, frozenset({EOS_ID}))
    assert all(matcher.accept_token(t) for t in ids) and not matcher.is_terminated()
    assert matcher.accept_token(EOS_ID) and matcher.is_terminated()
    wrong = tok.encode(
        CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "nope", add_special_tokens=False
    )
    matcher = grammars.matcher(spec, frozenset({EOS_ID}))
    assert not all(matcher.accept_token(t) for t in wrong)


# -- in the engine -----------------------------------------------------------------------------


def test_plain_requests_are_untouched_by_grammar_requests_in_their_batch(tiny):
    """deterministic mode: each request its own forward pass, so only the shared sampling step
    (one bitmask for the batch) could change a plain request's tokens."""
    plain = {f"plain{i}": (tiny.prompt[i:], SamplingParams(max_tokens=24, ignore_eos=True, **m))
             for i, m in enumerate(MODES)}  # fmt: skip
    alone = run(tiny.engine(deterministic=True), plain)
    spec = GrammarSpec("regex", LIST)
    constrained = {f"g{i}": (tiny.prompt[i:], SamplingParams(max_tokens=50, grammar=spec, **m))
                   for i, m in enumerate(MODES)}  # fmt: skip
    mixed = run(tiny.engine(deterministic=True), {**constrained, **plain})
    for key in plain:
        assert tokens_of(mixed[key]) == tokens_of(alone[key]), key
        assert [o.logprobs for o in mixed[key]] == [o.logprobs for o in alone[key]]
    for key in constrained:
        assert finished_by_grammar(mixed[key]) and re.fullmatch(LIST, text_of(mixed[key]))


def test_max_tokens_before_the_grammar_completes_finishes_length(tiny):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    outs = run(tiny.engine(), {"a": (tiny.prompt, SamplingParams(max_tokens=5, grammar=spec))})
    assert outs["a"][-1].finish_reason == "length" and len(tokens_of(outs["a"])) == 5
    with pytest.raises(json.JSONDecodeError):  # a prefix of a valid output, not one
        json.loads(text_of(outs["a"]))


def test_grammar_ends_the_request_even_with_ignore_eos(tiny):
    spec = GrammarSpec("regex", r"[0-9]{3}")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, grammar=spec)
    outs = run(tiny.engine(), {"a": (tiny.prompt, params)})["a"]
    assert finished_by_grammar(outs) and re.fullmatch(r"[0-9]{3}", text_of(outs))


def test_preempted_grammar_requests_keep_their_matcher(tiny, caplog):
    """A preempted request is recomputed with its output kept, and its matcher with it: a
    matcher started afresh would allow a second "[" and break the pattern."""
    spec = GrammarSpec("regex", LIST)
    requests = {i: (tiny.prompt[i:], SamplingParams(max_tokens=50, grammar=spec, **MODES[i % 2]))
                for i in range(4)}  # fmt: skip
    engine = tiny.engine(page_size=4, kv_cache_tokens=64)  # one or two requests at once
    with caplog.at_level(logging.WARNING, logger="hetero.engine.grammar"):
        outs = run(engine, requests)
    assert engine.scheduler.preemptions > 0
    assert not caplog.records, "a matcher rejected a sampled token"
    for out in outs.values():
        assert finished_by_grammar(out)
        assert re.fullmatch(LIST, text_of(out)), text_of(out)


# -- submission --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, named",
    [
        (GrammarSpec("json_schema", "{not json"), ["json_schema", "not valid JSON"]),
        (GrammarSpec("json_schema", '{"type": "wat"}'), ["json_schema", "wat"]),
        (GrammarSpec("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'),
         ["minLength 5", "maxLength 2"]),
        (GrammarSpec("regex", "([a-z"), ["regex", "Unclosed"]),
        (GrammarSpec("tool_calls", '{"tools": []}'), ["tool_calls", "tools"]),
        (GrammarSpec("tool_calls", json.dumps({"tools": TOOLS, "name": "nope"})),
         ["'nope'", "get_weather", "add"]),
        (GrammarSpec("tool_calls", json.dumps({"tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]})),
         ["'f'", "wat"]),
    ],
)  # fmt: skip
def test_a_grammar_that_does_not_compile_is_refused_at_submission(tiny, spec, named):
    engine = tiny.engine()
    with pytest.raises(RequestError) as e:
        engine.add_request(tiny.prompt, SamplingParams(grammar=spec))
    for word in named:
        assert word in str(e.value), str(e.value)
    assert not engine.has_work and not engine.requests
    with pytest.raises(RequestError):
        engine.check(tiny.prompt, SamplingParams(grammar=spec))


def test_grammar_spec_is_checked_and_hashable():
    with pytest.raises(ValueError, match="xml"):
        GrammarSpec("xml", "")
    a, b = (SamplingParams(grammar=GrammarSpec("regex", "a+")) for _ in range(2))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(ValueError, match="GrammarSpec"):
        SamplingParams(grammar="a+").check()


def test_bounded_strings_stay_valid_json(tiny):
    """xgrammar 0.2.9 lets raw control characters into strings with minLength/maxLength
    (mlc-ai/xgrammar#800); grammar.py hands it those bounds as a pattern instead."""
    schema = {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}}
    compiled = tiny.engine().grammars.compile(GrammarSpec("json_schema", json.dumps(schema)))
    for text, ok in [('["ab", "abcde"]', True), ('["a"]', False), ('["abcdef"]', False),
                     ('["a\x04b"]', False), ('["a\tb"]', False), ('["éé"]', True)]:  # fmt: skip
        matcher = GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text


def test_compiled_grammars_are_cached_per_spec(tiny):
    engine = tiny.engine()
    first = engine.grammars.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    assert engine.grammars.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))) is first


# -- the sampler's mask ------------------------------------------------------------------------


def _bitmask(allowed: list[list[int] | None], V: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 with the listed tokens' bits set (None: all)."""
    bits = torch.zeros(len(allowed), -(-V // 32) * 32, dtype=torch.bool)
    for b, ids in enumerate(allowed):
        bits[b, ids if ids is not None else slice(None)] = True
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int64)
    words = (bits.view(len(allowed), -1, 32).long() * weights).sum(-1)  # [B, ceil(V/32)]
    return words.to(torch.int32)


def _mask(allowed: list[list[int] | None], V: int, device="cpu") -> TokenMask:
    rows = [b for b, ids in enumerate(allowed) if ids is not None]
    return TokenMask(_bitmask(allowed, V).to(device), rows)


def _batch(params: list[SamplingParams], V: int, device: str, mask=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, list(range(n)), [3] * n, [[]] * n, [[]] * n, V, device,
                               mask)  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sample_masks_grammar_rows_only_and_keeps_raw_logprobs(device):
    V = 100
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)).to(device)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(seed=1, logprobs=2)] * 2
    allowed = [None, None, [5, 17, 99], [64]]
    free = sample(logits, _batch(params, V, device))
    masked = sample(logits, _batch(params, V, device, _mask(allowed, V, device)))
    assert masked.tokens[:2].tolist() == free.tokens[:2].tolist()
    assert masked.tokens[2].item() in allowed[2] and masked.tokens[3].item() == 64
    raw = torch.log_softmax(logits.float(), -1)  # the logits themselves were left alone
    torch.testing.assert_close(masked.logprobs, raw.gather(1, masked.tokens[:, None])[:, 0])
    torch.testing.assert_close(masked.top_logprobs, free.top_logprobs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_apply_mask_matches_a_dense_mask_on_its_rows_only(device):
    V = 77
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).to(device)
    allowed = [[0, 31, 32, 76], None, list(range(0, V, 3)), []]
    mask = _mask(allowed, V, device)
    mask.bitmask[1] = 0  # a row without a grammar is left alone whatever its bits say
    got = apply_mask(logits.clone(), mask)
    keep = torch.ones(4, V, dtype=torch.bool, device=device)
    for b in mask.rows:
        keep[b] = False
        keep[b, allowed[b]] = True
    assert torch.equal(got, logits.masked_fill(~keep, float("-inf")))
