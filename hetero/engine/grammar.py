"""Structured output: a request's `GrammarSpec`, compiled by xgrammar, masks its logits each step.

xgrammar matches bytes, not tokens: a grammar compiled against the engine's tokenizer allows,
at each step, exactly the tokens whose text keeps the output a prefix of the language, whether
a literal such as `<｜tool▁calls▁begin｜>` comes as one special token or spelled in pieces.
The engine's end-of-sequence tokens are allowed only where the language is complete, so a
request ends when its grammar does (the matcher is then terminated).

xgrammar is imported on first use, so an engine without grammar requests never loads it."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

KINDS = ("json_object", "json_schema", "regex", "tool_calls")
# Consecutive whitespace characters allowed between JSON tokens. Unbounded, a model (a random
# one always, small ones sometimes) can spend its whole budget on indentation.
MAX_JSON_WHITESPACE = 16
CACHE_SIZE = 128  # compiled grammars kept per engine (least recently used go first)
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # values, not subschemas


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. `source`: json_schema, the schema as JSON text;
    regex, the pattern; tool_calls, JSON text of {"tools": [OpenAI tool dicts], "name": the
    forced function's name or null, "parallel": false for exactly one call (default true, one
    or more)}; json_object, unused."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.source, str):
            raise ValueError(f"grammar source must be a str, not {type(self.source).__name__}")


class TokenMask(NamedTuple):
    """A step's grammar constraint: one bitmask for the batch, applied to the rows that have a
    grammar only (on a CPU, xgrammar's kernel takes 0.2-0.7 ms a row of 129k logits)."""

    bitmask: torch.Tensor  # [B, ceil(V/32)] int32: bit v of row b set = token v allowed
    rows: list[int]  # the rows with a grammar


def _xgr():
    import xgrammar

    return xgrammar


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _reason(e: Exception) -> str:
    """xgrammar's message without the time and C++ source line it starts with."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()) or type(e).__name__


def _bound_strings(schema: Any) -> Any:
    """The schema with each string's minLength/maxLength written as a pattern. xgrammar 0.2.9
    compiles length bounds to a character class that admits raw control characters, which is
    invalid JSON (mlc-ai/xgrammar#800); its pattern path is JSON-string-aware and does not.
    Either way a bounded string cannot hold escapes."""
    if isinstance(schema, list):
        return [_bound_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else _bound_strings(v) for k, v in schema.items()}
    lo, hi = out.get("minLength", 0), out.get("maxLength")
    if (
        out.get("type") == "string"
        and ("minLength" in out or "maxLength" in out)
        and not {"pattern", "format"} & out.keys()
        and type(lo) is int
        and (hi is None or type(hi) is int and lo <= hi)  # else xgrammar names the error
    ):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^.{{{lo},{'' if hi is None else hi}}}$"
    return out


def tool_calls_format(source: str) -> dict:
    """The structural tag (as a dict) of one or more DeepSeek-V3 tool calls to the tools in
    `source` (see GrammarSpec), each call's arguments held to its function's parameters."""
    from hetero.server import toolcalls as tc

    spec = _json(source, "the source")
    tools = spec.get("tools") if isinstance(spec, dict) else None
    if not isinstance(tools, list) or not tools:
        raise ValueError('"tools" must be a non-empty list')
    schemas = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tool {json.dumps(tool)[:80]} has no function name")
        schemas[fn["name"]] = _bound_strings(fn.get("parameters") or {"type": "object"})
        try:  # here, to name the tool: the whole tag's error would not
            _xgr().Grammar.from_json_schema(json.dumps(schemas[fn["name"]]))
        except Exception as e:
            raise ValueError(f"tool {fn['name']!r} parameters: {_reason(e)}") from None
    name = spec.get("name")
    if name is not None and name not in schemas:
        raise ValueError(f"forced tool {name!r} is not among the tools ({', '.join(schemas)})")
    tags = [
        {
            "type": "tag",
            "begin": f"{tc.CALL_BEGIN}function{tc.SEP}{n}{tc.ARGS_OPEN}",
            "content": {
                "type": "json_schema",
                "json_schema": schemas[n],
                "max_whitespace_cnt": MAX_JSON_WHITESPACE,
                # the format's markers never inside a string, so a parser may cut at the first
                # (strings with a pattern, bounded ones included, are not filtered by xgrammar)
                "excludes": [*tc.TOKENS, tc.EOS],
            },
            "end": f"{tc.ARGS_CLOSE}{tc.CALL_END}",
        }
        for n in ([name] if name is not None else schemas)
    ]
    if not isinstance(parallel := spec.get("parallel", True), bool):
        raise ValueError(f'"parallel" must be true or false, not {parallel!r}')
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
             "at_least_one": True, "stop_after_first": not parallel}  # fmt: skip
    return {
        "type": "structural_tag",
        "format": {"type": "tag", "begin": tc.CALLS_BEGIN, "content": calls, "end": tc.CALLS_END},
    }


def build_grammar(spec: GrammarSpec) -> xgrammar.Grammar:
    """The xgrammar Grammar of a spec; ValueError if its source is malformed."""
    Grammar = _xgr().Grammar
    if spec.kind == "json_object":  # any object: strict mode would allow only {}
        schema = '{"type": "object"}'
        return Grammar.from_json_schema(
            schema, strict_mode=False, max_whitespace_cnt=MAX_JSON_WHITESPACE
        )
    if spec.kind == "json_schema":
        schema = json.dumps(_bound_strings(_json(spec.source, "the schema")))
        return Grammar.from_json_schema(schema, max_whitespace_cnt=MAX_JSON_WHITESPACE)
    if spec.kind == "regex":
        return Grammar.from_regex(spec.source)
    return Grammar.from_structural_tag(tool_calls_format(spec.source))


class Grammars:
    """One engine's grammar compiler and its compiled grammars. Any thread may compile (the
    handle's callers do, at submission), so the lazy compiler and the cache sit behind a lock;
    compiling itself runs outside it."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self._lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        self._compiled: OrderedDict[GrammarSpec, xgrammar.CompiledGrammar] = OrderedDict()

    def _compiler_once(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                # vocab_size is the logits' width: ids past the tokenizer's are never allowed
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=sorted(self.stop_ids) or None,
                )  # fmt: skip
                # our LRU below bounds memory; xgrammar's own cache would grow without limit
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
                self._batch = xgr.BatchGrammarMatcher()
            return self._compiler

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """The spec compiled (cached); ValueError naming the problem if it does not compile."""
        with self._lock:
            if (hit := self._compiled.get(spec)) is not None:
                self._compiled.move_to_end(spec)
                return hit
        compiler = self._compiler_once()
        try:
            compiled = compiler.compile_grammar(build_grammar(spec))
        except Exception as e:  # ours are ValueErrors; xgrammar raises RuntimeError and others
            raise ValueError(f"{spec.kind} grammar: {_reason(e)}") from None
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec, stop_ids: frozenset[int]) -> xgrammar.GrammarMatcher:
        """A fresh matcher that ends on the request's stop tokens (the engine's if it has none,
        e.g. with ignore_eos: a grammar must be able to end)."""
        return _xgr().GrammarMatcher(
            self.compile(spec), override_stop_tokens=sorted(stop_ids) or None
        )

    def mask(self, matchers: list, device: torch.device | str) -> TokenMask | None:
        """Row b of the bitmask allows the tokens matchers[b] accepts next (all tokens where
        matchers[b] is None); None when no row has a grammar. Filled on the CPU (xgrammar's
        threads), then copied to `device`."""
        rows = [b for b, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = _xgr().allocate_token_bitmask(len(matchers), self.vocab_size)  # all ones
        self._compiler_once()
        self._batch.batch_fill_next_token_bitmask([matchers[b] for b in rows], bitmask, rows)
        return TokenMask(bitmask.to(device, non_blocking=True), rows)


def apply_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """[B, V] float32 logits with the tokens the mask leaves out of its rows set to -inf, in
    place (xgrammar's kernel: C++ on CPU, CUDA/Triton on GPU); other rows untouched."""
    V = logits.shape[-1]
    _xgr().apply_token_bitmask_inplace(logits, mask.bitmask, vocab_size=V, indices=mask.rows)
    return logits


def accept(matcher: xgrammar.GrammarMatcher, token: int) -> bool:
    """Advances the matcher by the sampled token; True when the grammar ends the request (its
    stop token taken, or a token it could not take, which the mask should have made impossible)."""
    if not matcher.accept_token(token):
        log.warning("grammar rejected sampled token %d; ending the request", token)
        return True
    return matcher.is_terminated()
