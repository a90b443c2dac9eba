"""Continuous batching: which tokens of which requests the next step computes.

Every step first gives each running request that is decoding its one token, then running
prompts their next chunk, then admits waiting requests (oldest first) while the token budget
(`max_num_batched_tokens`), the sequence limit and the free pages allow. A prompt is admitted
only when pages for all of it can be had (its cached prefix taken from the prefix cache); a
decoding request takes one more page every `page_size` tokens, and when none is left the newest
running request is preempted: its pages go back and it is recomputed later, output kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from hetero.engine.pages import PagePool
from hetero.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens a step (decode tokens + prompt chunks)
    # deterministic mode: a prompt goes in chunks of exactly this many tokens (its last one
    # shorter), whatever else is running, so its chunks depend on its own length only (0: a
    # chunk takes what the budget leaves)
    fixed_chunk: int = 0


class Work(NamedTuple):
    """Request `request` computes tokens [start, start + n) this step."""

    request: Request
    start: int
    n: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's newest token: its logits give the next one."""
        return self.start + self.n == self.request.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool) -> None:
        self.config, self.pool = config, pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission: the last is the newest
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
        work: list[Work] = []
        for req in [r for r in self.running if not r.is_prefilling]:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted by an older one this step
                continue
            if not self._grow(req, req.num_tokens):
                continue  # req itself was preempted (it was the newest)
            work.append(Work(req, req.num_computed, 1))
            budget -= 1
        for req in [r for r in self.running if r.is_prefilling]:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue
            if (n := self._chunk(req, budget)) == 0:
                break
            work.append(Work(req, req.num_computed, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self._chunk(req, budget) == 0 or not self._admit(req):
                break  # first come, first served: nobody overtakes the oldest waiting request
            self.waiting.popleft()
            n = self._chunk(req, budget)
            work.append(Work(req, req.num_computed, n))
            budget -= n
        return work

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens of req's prompt this step: what the budget leaves, or, with fixed chunks, the
        next whole chunk if it fits (0: wait for the next step)."""
        left = req.num_tokens - req.num_computed
        if not self.config.fixed_chunk:
            return min(left, budget)
        n = min(left, self.config.fixed_chunk)
        return n if n <= budget else 0

    def _grow(self, req: Request, tokens: int) -> bool:
        """Pages for `tokens` tokens of req, preempting the newest running requests as needed;
        False if req itself had to go."""
        need = self.pool.pages_for(tokens) - len(req.pages)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        req.pages += self.pool.allocate(max(need, 0))
        return True

    def _admit(self, req: Request) -> bool:
        pool = self.pool
        hits, keys = pool.match_prefix(req.tokens)
        idle_hits = sum(1 for p in hits if pool.refs[p] == 0)  # counted in num_free until taken
        new = pool.pages_for(req.num_tokens) - len(hits)
        if new + idle_hits > pool.num_free:
            return False
        pool.acquire(hits)
        req.pages = hits + pool.allocate(new)
        req.keys = keys
        req.num_computed = len(hits) * pool.page_size
        if req.cached_tokens is None:  # the first admission: what the prompt found cached
            req.cached_tokens = req.num_computed
            pool.stats.prompt_tokens += req.num_prompt
            pool.stats.hit_tokens += req.num_computed
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    def preempt(self, req: Request) -> None:
        """Frees req's pages (its full ones stay cached) and puts it first in line."""
        self.running.remove(req)
        self.pool.release(req.pages)
        req.pages, req.keys, req.num_computed = [], [], 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Ends req (stop, length, abort) and frees its pages at once."""
        if req.finished:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.pool.release(req.pages)
        else:
            self.waiting.remove(req)
        req.pages, req.keys = [], []
        req.status, req.finish_reason = Status.FINISHED, reason

    def postprocess(
        self, work: list[Work], tokens: dict[str, int]
    ) -> list[tuple[Request, str | None]]:
        """Advances each request by its chunk and appends its sampled token (`tokens`: request
        id -> token, for work that samples). -> each request that got a token, with the finish
        reason that token causes (stop token, max_tokens); the caller, who also knows the stop
        strings, finishes it."""
        out = []
        for w in work:
            req = w.request
            req.num_computed = w.start + w.n
            req.key_full_pages(self.pool)
            if w.samples:
                out.append((req, req.append(tokens[req.id])))
        return out
