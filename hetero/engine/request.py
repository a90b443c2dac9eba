"""One request's state as the engine sees it (nano-vllm's `sequence.py`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from hetero.engine.pages import PagePool, page_hash
from hetero.engine.params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens found in the prefix cache (at first admission)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Request:
    """`tokens` is the prompt followed by the output so far; the cache holds the first
    `num_computed` of them in `pages` (whose first `len(keys)` pages are full and keyed)."""

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
        stop_ids: frozenset[int], matcher: GrammarMatcher | None = None,
    ) -> None:  # fmt: skip
        self.id = request_id
        self.tokens = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.params, self.seed, self.stop_ids = params, seed, stop_ids
        # the grammar's state after the output so far; a preemption keeps both
        self.matcher = matcher
        self.status = Status.WAITING
        self.pages: list[int] = []
        self.keys: list[bytes] = []
        self.num_computed = 0
        self.cached_tokens: int | None = None  # prefix hit at first admission
        self.finish_reason: str | None = None
        self.preemptions = 0
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token still lacks its KV (a prompt, or a recompute)."""
        return self.num_tokens - self.num_computed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def usage(self) -> Usage:
        return Usage(self.num_prompt, self.num_output, self.cached_tokens or 0)

    def key_full_pages(self, pool: PagePool) -> None:
        """Key every page that is now full of computed tokens, so later prompts can reuse it."""
        ps = self.num_computed // pool.page_size
        for i in range(len(self.keys), ps):
            parent = self.keys[-1] if self.keys else b""
            key = page_hash(parent, self.tokens[i * pool.page_size : (i + 1) * pool.page_size])
            pool.register(self.pages[i], key)
            self.keys.append(key)

    def append(self, token: int) -> str | None:
        """Adds a sampled token; -> the finish reason it causes, if any."""
        self.tokens.append(token)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if token in self.stop_ids:
            return "stop"
        if self.num_output >= self.params.max_tokens:
            return "length"
        return None
