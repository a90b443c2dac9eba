"""`hetero chat`: turns, streaming, /reset, the context budget, and a real terminal session."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
from transformers import AutoTokenizer

from hetero.chat import Detokenizer, chat_loop, prompt_ids
from hetero.generate import SamplingParams, generate
from hetero.loader import load_model


@pytest.fixture(scope="module")
def setup(tiny_v3):
    model = load_model(tiny_v3, dtype=torch.float32, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_v3)
    return model, tok


def scripted(lines):
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def test_a_reply_is_the_greedy_completion_of_the_template(setup):
    model, tok = setup
    params = SamplingParams(max_tokens=12, stop_token_ids=(tok.eos_token_id,))
    out = io.StringIO()
    turns = chat_loop(model, tok, params, scripted(["def f(x):", "/reset", "", "again"]), out)
    assert turns == 2
    text = [{"role": "user", "content": "def f(x):"}]
    ids = tok.encode(
        tok.apply_chat_template(text, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    want = [t for t in generate(model, [ids], params)[0] if t != tok.eos_token_id]
    lines = out.getvalue().split("\n")  # not splitlines: a random reply may hold \x1c
    assert lines[1] == "hetero> " + tok.decode(want, skip_special_tokens=True)
    assert "(conversation cleared)" in lines


def test_detokenizer_never_splits_a_character(setup):
    _, tok = setup
    ids = tok.encode("naïve café → ok", add_special_tokens=False)
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == "naïve café → ok" and not any("\ufffd" in p for p in pieces)


def test_old_turns_are_dropped_to_fit(setup):
    _, tok = setup
    messages = []
    for i in range(30):
        messages += [{"role": "user", "content": f"question {i} " * 5}]
        messages += [{"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last"})
    ids = prompt_ids(tok, messages, budget=60)
    assert len(ids) <= 60 and tok.decode(ids).rstrip().endswith("<｜Assistant｜>")
    assert "last" in tok.decode(ids) and "question 0 " not in tok.decode(ids)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_in_a_terminal(tiny_v3):
    """The console command in a pseudo-terminal, typed at as a person would."""
    import pty
    import select
    import subprocess
    import time

    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "hetero.cli", "chat", "--model", str(tiny_v3)]
    cmd += ["--max-tokens", "8", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen, deadline = b"", time.time() + 120

    def until(marker: bytes, count: int = 1) -> None:
        nonlocal seen
        while seen.count(marker) < count and time.time() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)

    until(b"you> ")
    os.write(leader, b"def add(a, b):\n")
    until(b"hetero> ")
    until(b"you> ", 2)  # the next prompt, after the reply
    os.write(leader, b"/exit\n")
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert text.count("you> ") >= 2 and "hetero> " in text and "Traceback" not in text
