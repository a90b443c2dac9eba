"""What the EngineHandle tests share (tests/test_handle.py, test_handle_lifecycle.py): the demo
model with hetero.generate's greedy reference, a handle factory, polling helpers, and a gate
that holds the engine loop before each step.

Nothing waits on a timer to decide a result: state is polled until it holds or a generous
deadline passes, and where a test needs the loop at a known point it gates `engine.step`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.engine.engine import Engine, ServingConfig
from hetero.engine.handle import EngineHandle
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.generate import SamplingParams as GenerateParams
from hetero.generate import generate
from hetero.loader import load_model

DEMO = demo_dir()
EOS = 1
DEADLINE_S = 120.0  # generous: a slow, shared CPU

SOURCE = '''def read_config(path, defaults=None):
    """Return the settings in the file at path, over the defaults."""
    settings = dict(defaults or {})
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


@dataclass
class Demo:
    model: torch.nn.Module
    tok: object
    ids: list[int]
    done: dict = field(default_factory=dict)

    def reference(self, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
        """hetero.generate's greedy tokens for each prompt (never stopping early). Call it
        before a handle runs: the model is not meant to run in two threads at once."""
        todo = [p for p in dict.fromkeys(map(tuple, prompts)) if (p, max_tokens) not in self.done]
        if todo:
            outs = generate(self.model, [list(p) for p in todo], GenerateParams(max_tokens))
            self.done.update({(p, max_tokens): out for p, out in zip(todo, outs)})
        return [self.done[tuple(p), max_tokens] for p in prompts]


@pytest.fixture(scope="module")
def demo() -> Demo:
    model = load_model(DEMO, dtype=torch.float32, progress=False)
    tok = AutoTokenizer.from_pretrained(DEMO)
    return Demo(model, tok, tok.encode(SOURCE, add_special_tokens=False))


@pytest.fixture
def make_handle(demo):
    handles = []

    def make(**config) -> EngineHandle:
        engine = Engine(demo.model, demo.tok, ServingConfig(**config), eos_ids=(EOS,))
        handles.append(EngineHandle(engine, idle_s=0.01))
        return handles[-1]

    yield make
    for h in handles:
        h.close()


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for t in out.token_ids]


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def assert_stream(outs: list[RequestOutput], finish_reason: str) -> None:
    assert outs and outs[-1].finish_reason == finish_reason
    assert all(o.finish_reason is None for o in outs[:-1])


class StepGate:
    """Holds the engine loop before each step until `advance` lets steps through."""

    def __init__(self, handle: EngineHandle, monkeypatch) -> None:
        self.handle, self.permits, self.let = handle, threading.Semaphore(0), 0
        step = handle.engine.step

        def gated():
            assert self.permits.acquire(timeout=DEADLINE_S), "the test never let a step through"
            return step()

        monkeypatch.setattr(handle.engine, "step", gated)

    def advance(self, n: int = 1) -> None:
        """Lets n more steps run and waits until they have."""
        self.let += n
        self.permits.release(n)
        wait_for(lambda: self.handle.stats().steps == self.let, f"step {self.let}")
