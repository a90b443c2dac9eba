"""What a request asks of the sampler and of the stop rules: one frozen `SamplingParams`.

Names follow OpenAI's API where it has one (temperature, top_p, presence_penalty, ...) and vLLM's
common extensions otherwise (top_k, min_p, repetition_penalty, ignore_eos)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from hetero.engine.grammar import GrammarSpec

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0: all
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    seed: int | None = None  # None: a fresh seed a request
    # > 1 discourages every token already in the prompt or the output (HF/vLLM: a positive
    # logit is divided by it, a negative one multiplied)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already output
    frequency_penalty: float = 0.0  # OpenAI: subtracted once a time a token was output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence tokens
    stop: tuple[str, ...] = ()  # stop strings: never in the output
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (stop_token_ids still stop)
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's and the n most likely
    skip_special_tokens: bool = True  # in the detokenized text
    # the output must match it (hetero/engine/grammar.py); compiled at submission
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        # tuples, not lists or dicts, so the params stay hashable and frozen
        if isinstance(self.logit_bias, dict):
            items = tuple(sorted((int(k), float(v)) for k, v in self.logit_bias.items()))
            object.__setattr__(self, "logit_bias", items)
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def check(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first field out of range."""
        rules = {
            "max_tokens": (self.max_tokens >= 1, "must be >= 1"),
            "temperature": (0 <= self.temperature <= 100, "must be in [0, 100]"),
            "top_p": (0 < self.top_p <= 1, "must be in (0, 1]"),
            "top_k": (self.top_k >= 0, "must be >= 0 (0: off)"),
            "min_p": (0 <= self.min_p <= 1, "must be in [0, 1]"),
            "repetition_penalty": (0 < self.repetition_penalty <= 10, "must be in (0, 10]"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            "logprobs": (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
        }
        for name, (ok, why) in rules.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2**63)")
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop strings are not allowed")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar={self.grammar!r} must be a GrammarSpec")
        if vocab_size is not None:
            for name, ids in (
                ("logit_bias", [t for t, _ in self.logit_bias]),
                ("stop_token_ids", self.stop_token_ids),
            ):
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(f"{name}: token id {bad[0]} outside [0, {vocab_size})")
        for t, b in self.logit_bias:
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias[{t}]={b} must be in [-100, 100]")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
