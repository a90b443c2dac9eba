"""`hetero chat`: turns, streaming, /reset, the context budget, and a real terminal session."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
from transformers import AutoTokenizer

from hetero.chat import QUIT, chat_loop, prompt_ids
from hetero.engine.engine import Engine, ServingConfig
from hetero.engine.params import SamplingParams
from hetero.generate import SamplingParams as StaticParams
from hetero.generate import generate
from hetero.loader import load_model


@pytest.fixture(scope="module")
def setup(tiny_v3):
    model = load_model(tiny_v3, dtype=torch.float32, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_v3)
    return model, tok


def engine_of(model, tok, page_size=16):
    config = ServingConfig(page_size=page_size, kv_cache_tokens=512)
    return Engine(model, tok, config, eos_ids=(tok.eos_token_id,))


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
    params = SamplingParams(max_tokens=12, temperature=0)
    out = io.StringIO()
    engine = engine_of(model, tok)
    turns = chat_loop(engine, tok, params, scripted(["def f(x):", "/reset", "", "again"]), out)
    assert turns == 2
    text = [{"role": "user", "content": "def f(x):"}]
    ids = tok.encode(
        tok.apply_chat_template(text, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    static = StaticParams(max_tokens=12, stop_token_ids=(tok.eos_token_id,))
    want = [t for t in generate(model, [ids], static)[0] if t != tok.eos_token_id]
    lines = out.getvalue().split("\n")  # not splitlines: a random reply may hold \x1c
    assert lines[1] == "hetero> " + tok.decode(want, skip_special_tokens=True)
    assert "(conversation cleared)" in lines


def test_ctrl_c_at_the_prompt_drops_the_line(setup):
    model, tok = setup
    params = SamplingParams(max_tokens=4, temperature=0)
    feed = iter(["", KeyboardInterrupt, "/exit", "never read"])

    def read(prompt: str) -> str:
        line = next(feed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    out = io.StringIO()
    try:
        assert chat_loop(engine_of(model, tok), tok, params, read, out) == 0
    except KeyboardInterrupt:  # uncaught, it would stop pytest itself
        pytest.fail("Ctrl-C at the prompt ended the chat")
    assert QUIT in out.getvalue() and "hetero> " not in out.getvalue()
    assert next(feed) == "never read"  # /exit ended it


def test_a_second_turn_reuses_the_first_turns_pages(setup):
    """The engine's prefix cache keeps the conversation: turn 2's prompt starts with turn 1's,
    whose full pages are not computed again."""
    model, tok = setup
    engine = engine_of(model, tok, page_size=4)
    params = SamplingParams(max_tokens=6, temperature=0)
    first = [{"role": "user", "content": "def add(a, b):"}]
    first_ids = prompt_ids(tok, first, budget=400)
    assert chat_loop(engine, tok, params, scripted(["def add(a, b):", "and sub?"]), io.StringIO())
    stats = engine.pool.stats
    assert stats.prompt_tokens > 2 * len(first_ids)  # both turns were admitted
    assert stats.hit_tokens >= (len(first_ids) - 1) // 4 * 4 > 0
    assert engine.pool.num_free == engine.pool.capacity  # all pages back (cached ones count)


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
    """The console command in a pseudo-terminal, typed at as a person would: a question, Ctrl-C
    at the prompt (no traceback), and `/eit` corrected with the arrow keys into `/exit`."""
    import pty
    import select
    import signal
    import subprocess
    import time

    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "hetero.cli", "chat", "--model", str(tiny_v3)]
    cmd += ["--max-tokens", "8", "--device", "cpu"]
    env = {**os.environ, "TERM": "xterm"}
    # SIGINT as a terminal's program has it: a job started in the background of a script
    # (`ci &`) inherits it ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(
        cmd,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(follower)
    # one deadline for the whole session: generous, since a loaded 2-core machine took ~120 s
    # to reach the Ctrl-C step, and another (other tests' processes beside it) over 300 s: the
    # test then failed on the deadline, not on the program
    seen, deadline = b"", time.time() + 900

    def until(marker: bytes, count: int = 1, within: float = 120) -> bool:
        nonlocal seen
        end = min(deadline, time.time() + within)
        while seen.count(marker) < count and time.time() < end:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:  # EIO: the program has ended
                    break
        return seen.count(marker) >= count

    assert until(b"you> "), seen
    os.write(leader, b"def add(a, b):\n")
    assert until(b"hetero> ") and until(b"you> ", 2), seen  # the reply, then the next prompt
    # Ctrl-C while the prompt waits; again if the first came before readline began to wait
    # (between writing the prompt and select(), Python only notices a signal at the next key)
    for _ in range(10):
        proc.send_signal(signal.SIGINT)
        if until(QUIT.encode(), within=1):
            break
    assert until(QUIT.encode(), within=300) and until(b"you> ", 3), seen
    os.write(leader, b"/eit\x1b[D\x1b[Dx\n")  # two Left arrows, then the missing x
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert text.count("hetero> ") == 1 and QUIT in text and "Traceback" not in text
