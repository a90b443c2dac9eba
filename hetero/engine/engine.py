"""The step loop (nano-vllm's `llm_engine`): schedule -> run the model -> sample -> outputs.

Not thread-safe; `hetero.engine.handle.EngineHandle` runs it in its own thread for callers."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

import torch

from hetero.engine.detokenizer import IncrementalDetokenizer
from hetero.engine.grammar import Grammars, accept
from hetero.engine.outputs import RequestOutput, TokenLogprob
from hetero.engine.pages import PagePool
from hetero.engine.params import SamplingParams
from hetero.engine.request import Request
from hetero.engine.runner import ModelRunner
from hetero.engine.sampler import SampleOutput, SamplingBatch, sample
from hetero.engine.scheduler import Scheduler, SchedulerConfig, Work
from hetero.model import Transformer


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context or the pool, bad params)."""


@dataclass(frozen=True)
class ServingConfig:
    page_size: int = 64  # tokens a KV page
    kv_cache_tokens: int = 65536  # the pool's size (the memory plan gives the default)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # a step's tokens: decode tokens + prompt chunks
    max_model_len: int = 0  # a request's prompt + output; 0: the model's context
    # decode steps of up to this many requests replay CUDA graphs (0: never; GPU only)
    cuda_graph_max_batch: int = 64
    # a greedy request's tokens do not depend on what else runs: each request its own forward
    # pass, prompts in fixed chunks of `deterministic_chunk` tokens (the cost: no batching)
    deterministic: bool = False
    deterministic_chunk: int = 512
    # every this many steps, swap the coldest GPU-resident experts for hotter CPU ones from
    # the live routing (hetero.sched.hot_experts; layers with gpu_format int4 = the CPU's); 0: off
    hot_experts_every: int = 0

    def __post_init__(self) -> None:
        for name in ("page_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens",
                     "deterministic_chunk"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ServingConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("max_model_len", "cuda_graph_max_batch", "hot_experts_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServingConfig.{name} = {getattr(self, name)}: must be >= 0")

    @property
    def num_pages(self) -> int:
        return -(-self.kv_cache_tokens // self.page_size) + 1  # + the padding page


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        config: ServingConfig = ServingConfig(),
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.vocab_size = model.config.vocab_size
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.eos_ids = frozenset(eos_ids)
        self.grammars = Grammars(tokenizer, self.vocab_size, tuple(sorted(self.eos_ids)))
        self.pool = PagePool(config.num_pages, config.page_size)
        self.cache = model.new_paged_cache(config.num_pages, config.page_size)
        chunk = min(config.deterministic_chunk, config.max_num_batched_tokens)
        sched = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, chunk if config.deterministic else 0
        )
        self.scheduler = Scheduler(sched, self.pool)
        on_gpu = self.cache.latent.is_cuda
        graph_batch = config.cuda_graph_max_batch if on_gpu else 0
        hot = None
        if config.hot_experts_every:
            from hetero.sched.hot_experts import HotConfig, HotExperts

            hot = HotExperts(model, HotConfig(every=config.hot_experts_every))
        self.runner = ModelRunner(
            model, self.cache, self.max_model_len, graph_batch, on_gpu, config.deterministic, hot
        )
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """RequestError, naming the numbers, for a request this engine can never serve. Reads
        only what never changes (and the locked grammar cache), so any thread may call it."""
        try:
            params.check(self.vocab_size)
            if params.grammar is not None:  # compiled here, in the caller's thread, and cached
                self.grammars.compile(params.grammar)
        except ValueError as e:
            raise RequestError(str(e)) from None
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty: at least one token is needed")
        if bad := [t for t in prompt_ids if not 0 <= t < self.vocab_size]:
            raise RequestError(f"prompt token id {bad[0]} outside [0, {self.vocab_size})")
        for limit, what in (
            (self.max_model_len, "this model's context is"),
            (self.pool.capacity * self.pool.page_size, "the KV cache holds"),
        ):
            if n + params.max_tokens > limit:
                raise RequestError(
                    f"{what} {limit} tokens; the prompt has {n} and max_tokens asks for "
                    f"{params.max_tokens} more ({n + params.max_tokens} in all)"
                )

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Checks the request (`check`) and queues it; -> its id."""
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        self.check(prompt_ids, params)
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        spec = params.grammar
        matcher = self.grammars.matcher(spec, stop_ids) if spec is not None else None
        req = Request(rid, prompt_ids, params, seed, stop_ids, matcher)
        self.requests[rid] = req
        self.detok[rid] = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens
        )
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends the request now and frees its pages; -> its last output (None if unknown)."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        self.scheduler.finish(req, "abort")
        return self._output(req, (), "", None)

    def fail_running(self, error: str) -> list[RequestOutput]:
        """After a step raised `error`: its running requests end ("error"), their pages freed;
        the waiting ones stay queued."""
        outs = []
        for req in list(self.scheduler.running):
            self.scheduler.finish(req, "error")
            outs.append(self._output(req, (), "", None, error=error))
        return outs

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        work = self.scheduler.schedule()
        logits = self.runner.run(work)
        sampled = self.sample([w for w in work if w.samples], logits)
        return self.postprocess(work, sampled)

    def sample(self, work: list[Work], logits: torch.Tensor) -> SampleOutput:
        reqs = [w.request for w in work]
        params = [r.params for r in reqs]
        needs_history = any(
            p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params
        )
        batch = SamplingBatch.build(
            params,
            [r.seed for r in reqs],
            [r.num_output for r in reqs],
            [r.tokens[: r.num_prompt] if needs_history else [] for r in reqs],
            [r.output_ids if needs_history else [] for r in reqs],
            self.vocab_size,
            logits.device,
            self.grammars.mask([r.matcher for r in reqs], logits.device),
        )
        return sample(logits, batch)

    def postprocess(self, work: list[Work], sampled: SampleOutput) -> list[RequestOutput]:
        sampling = [w.request for w in work if w.samples]
        tokens = dict(zip((r.id for r in sampling), sampled.tokens.tolist()))
        logprobs = _logprobs(sampling, sampled)
        outputs = []
        for req, reason in self.scheduler.postprocess(work, tokens):
            if req.matcher is not None and accept(req.matcher, req.tokens[-1]):
                reason = "stop"  # the grammar is complete (or could not go on)
            detok = self.detok[req.id]
            delta = detok.push([req.tokens[-1]])
            text = delta.text
            if delta.stopped is not None:  # a stop string outranks max_tokens
                reason = "stop"
            elif reason is not None:
                text += detok.flush()
            if reason is not None:
                self.scheduler.finish(req, reason)
            outputs.append(self._output(req, (req.tokens[-1],), text, logprobs.get(req.id),
                                        delta.stopped))  # fmt: skip
        return outputs

    def _output(self, req, token_ids, text, logprob, stop=None, error=None) -> RequestOutput:
        first = token_ids and req.num_output == 1
        tpot = None
        if req.finished and req.num_output > 1 and req.first_token_at is not None:
            tpot = (req.last_token_at - req.first_token_at) / (req.num_output - 1)
        if req.finished:  # the engine forgets it; its stats stay in what was returned
            self.requests.pop(req.id, None)
            self.detok.pop(req.id, None)
        return RequestOutput(
            request_id=req.id,
            token_ids=token_ids,
            text=text,
            logprobs=(logprob,) if logprob is not None else None,
            finish_reason=req.finish_reason,
            usage=req.usage(),
            stop=stop,
            ttft_s=(req.first_token_at - req.arrival) if first else None,
            tpot_s=tpot,
            error=error,
        )


def _logprobs(reqs: list[Request], sampled: SampleOutput) -> dict[str, TokenLogprob]:
    """The logprobs each request asked for, by request id."""
    asked = [(i, r) for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not asked:
        return {}
    lp = sampled.logprobs.tolist()
    toks = sampled.tokens.tolist()
    top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
    top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
    out = {}
    for i, r in asked:
        n = r.params.logprobs
        top = tuple(zip(top_ids[i][:n], top_lp[i][:n])) if n and top_ids else ()
        out[r.id] = TokenLogprob(toks[i], lp[i], top)
    return out
