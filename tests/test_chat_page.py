"""The chat page (hetero/server/static/) in headless Chromium.

Chromium is driven over its DevTools protocol (CDP) through a pipe, `--remote-debugging-pipe`:
it reads commands on fd 3 and writes replies and events on fd 4, each a JSON message ended by a
NUL byte, so no websocket client (no new dependency) is needed. The page is loaded from the
`chat_server` fixture, which for now is a stub speaking OpenAI's streaming contract; everything
outside that fixture relies on the contract only (GET /v1/models, POST /v1/chat/completions
streaming `data: {...}` chunks, a usage chunk and `data: [DONE]`, `{"error": {...}}` bodies), so
the fixture can be swapped for the real server. The client-side failure cases (a stream cut
before [DONE], a 401 asking for an API key) are made in the page by wrapping `fetch`.

Skipped when no Chromium binary exists (Debian: `apt-get install chromium`; or set
HETERO_CHROMIUM to a Chromium/Chrome binary)."""

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hetero.testing.browser import BUSY, IDLE, Browser, find_chromium, last_reply, send_message

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or set HETERO_CHROMIUM)"
)
STATIC = Path(__file__).resolve().parents[1] / "hetero" / "server" / "static"


# ------------------------------------------------------------------------------------------------
# The server under test. STUB for now: the lead swaps this one fixture for the real server; it
# must yield a ChatServer (`disconnected` is set once the server saw a client go mid-stream;
# `canned` is the stub's known answer, None for a real model, whose text the tests can't know).
# ------------------------------------------------------------------------------------------------


@dataclass
class Canned:
    reasoning: str
    content: str
    code: str  # the text of the answer's fenced code block
    completion_tokens: int


@dataclass
class ChatServer:
    url: str  # ends with "/"
    disconnected: threading.Event
    canned: Canned | None = None


_REASONING = ["The user ", "greets me; ", "answer with ", "a little code."]
_CODE = "def add(a, b):\n    return a + b  # a < b & b > a"
_ANSWER = (
    "## Hello from the stub\n\nHere is **bold** and *italic* text, `inline code` and a list:\n\n"
    "- first item\n- second item\n\n```python\n" + _CODE + "\n```\n\n"
    "Raw <b>markup</b> stays text. See [the docs](https://example.com/docs)."
)
_DELAY = 0.03  # seconds between chunks: a reply takes about 1.5 s, time enough to press Stop


@pytest.fixture(scope="module")
def chat_server():
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    pieces = [_ANSWER[i : i + 6] for i in range(0, len(_ANSWER), 6)]
    canned = Canned("".join(_REASONING), _ANSWER, _CODE, len(_REASONING) + len(pieces))
    disconnected = threading.Event()
    app = FastAPI()

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def asset(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return JSONResponse({"error": {"message": f"no static file {name!r}"}}, 404)
        return FileResponse(path)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                            "owned_by": "stub"}]}  # fmt: skip

    def error(message: str, param: str | None = None) -> JSONResponse:
        body = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
        return JSONResponse({"error": body}, status_code=400)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return error("max_tokens: Input should be greater than or equal to 1", "max_tokens")
        if not body.get("messages"):
            return error("messages: this field is required", "messages")
        if not body.get("stream"):
            return error("the stub streams only", "stream")
        usage = (body.get("stream_options") or {}).get("include_usage")

        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            event = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                     "model": "stub-model", "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(event)}\n\n"

        async def events():
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                await asyncio.sleep(0.1)
                for piece in _REASONING:
                    yield chunk({"reasoning_content": piece})
                    await asyncio.sleep(_DELAY)
                for piece in pieces:
                    yield chunk({"content": piece})
                    await asyncio.sleep(_DELAY)
                yield chunk({}, "stop")
                if usage:
                    n = canned.completion_tokens
                    u = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
                    event = {"id": "chatcmpl-stub", "choices": [], "usage": u}
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
            finally:  # Starlette cancels the stream when the client disconnects
                if not finished:
                    disconnected.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the stub server did not start"
    yield ChatServer(f"http://127.0.0.1:{port}/", disconnected, canned)
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


# Wraps window.fetch: records each request (url, headers, JSON body); `__spy.mode = "cut"` drops
# the `data: [DONE]` line of chat streams (a stream cut at its end); `__spy.mode = "key"` answers
# 401 to chat requests without `Authorization: Bearer sekret`, as a server with an API key does.
SPY = r"""(() => {
  if (window.__spy) return;
  const spy = window.__spy = { requests: [], mode: null };
  const realFetch = window.fetch.bind(window);
  window.fetch = async (url, init = {}) => {
    const headers = { ...(init.headers || {}) };
    const body = init.body ? JSON.parse(init.body) : null;
    spy.requests.push({ url: String(url), headers, body });
    const chat = String(url).endsWith("/v1/chat/completions");
    if (chat && spy.mode === "key" && headers.Authorization !== "Bearer sekret") {
      const error = { message: "a valid API key is required", type: "authentication_error" };
      return new Response(JSON.stringify({ error }), { status: 401,
        headers: { "Content-Type": "application/json" } });
    }
    const resp = await realFetch(url, init);
    if (!chat || spy.mode !== "cut" || !resp.ok) return resp;
    const decoder = new TextDecoder(), encoder = new TextEncoder();
    let rest = "";
    const keep = (text) => text.split("\n").filter((l) => l.trim() !== "data: [DONE]").join("\n");
    const cut = new TransformStream({
      transform(chunk, out) {
        rest += decoder.decode(chunk, { stream: true });
        const end = rest.lastIndexOf("\n");
        if (end < 0) return;
        out.enqueue(encoder.encode(keep(rest.slice(0, end + 1))));
        rest = rest.slice(end + 1);
      },
      flush(out) { out.enqueue(encoder.encode(keep(rest))); },
    });
    return new Response(resp.body.pipeThrough(cut), { status: resp.status, headers: resp.headers });
  };
})()"""


@pytest.fixture
def page(browser, chat_server):
    """The chat page, freshly loaded with empty localStorage and the fetch spy installed."""
    browser.load(chat_server.url)
    browser.js("localStorage.clear()")
    browser.reload()
    browser.wait_for("!!window.renderMarkdown && document.readyState === 'complete'", "the page")
    browser.wait_for("[...document.querySelectorAll('#model option')].some(o => o.value)",
                     "the model list")  # fmt: skip
    browser.js(SPY)
    browser.events.clear()
    browser.dialogs.clear()
    browser.dialog_answer = ""
    chat_server.disconnected.clear()
    yield browser
    errors = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in browser.events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"].get("type") == "error"]  # fmt: skip
    assert not errors, f"the page logged errors: {errors}"


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


def test_page_is_labelled_and_keeps_settings(page):
    assert page.js("document.title")
    assert page.js("document.activeElement.id") == "input"  # autofocus on the message box
    for field in ("input", "model", "system", "temperature", "max-tokens"):
        assert page.js(f"!!document.querySelector('label[for=\"{field}\"]')"), field
    assert page.js("document.querySelector('#model').value")  # filled from GET /v1/models
    page.click("#settings > summary")
    page.click("#system")
    page.type("Be brief.")
    page.click("#temperature")
    page.type("0.5")
    page.click("#max-tokens")
    page.type("64")
    page.reload()
    page.wait_for("!!window.renderMarkdown", "the reloaded page")
    values = page.js(
        "['system', 'temperature', 'max-tokens'].map(i => document.getElementById(i).value)"
    )
    assert values == ["Be brief.", "0.5", "64"]
    page.js("localStorage.clear()")


def test_chat_streams_markdown_reasoning_and_stats(page, chat_server, tmp_path):
    page.click("#input")
    page.type("Hello")
    page.enter(shift=True)  # Shift+Enter: a new line, nothing sent
    page.type("there")
    assert page.js("document.querySelector('#input').value") == "Hello\nthere"
    assert page.js("document.querySelectorAll('.msg').length") == 0
    page.enter()
    page.wait_for(BUSY, "the Stop button")
    assert page.js("document.querySelector('#input').value") == ""
    page.wait_for(IDLE, "the reply to finish", timeout=20)

    assert page.js("document.querySelector('.msg.user .body').textContent") == "Hello\nthere"
    reply = last_reply(page)
    assert reply["error"] is None, reply["error"]
    assert reply["text"].strip()
    assert re.search(r"TTFT \d+(\.\d+)? m?s", reply["meta"]), reply["meta"]
    assert re.search(r"\d+(\.\d+)? tok/s", reply["meta"]), reply["meta"]
    sent = page.js("__spy.requests.filter(r => r.url.endsWith('/v1/chat/completions'))")
    assert len(sent) == 1
    body = sent[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Hello\nthere"}]
    assert body["model"] == page.js("document.querySelector('#model').value")

    canned = chat_server.canned
    if canned is not None:
        assert "Hello from the stub" in page.js("[...document.querySelectorAll('.content h2')]"
                                                ".map(h => h.textContent).join()")  # fmt: skip
        assert reply["code"] == [canned.code]
        assert page.js("!!document.querySelector('.content .code-block .copy-code')")
        assert "<strong>bold</strong>" in reply["html"] and "<em>italic</em>" in reply["html"]
        assert "<code>inline code</code>" in reply["html"]
        assert page.js("document.querySelectorAll('.content ul > li').length") == 2
        assert "Raw <b>markup</b> stays text." in reply["text"]  # escaped, not rendered
        assert page.js("document.querySelector('.content b')") is None
        link = page.js(
            "(a => a && [a.href, a.rel, a.target])(document.querySelector('.content a'))"
        )
        assert link == ["https://example.com/docs", "noopener noreferrer", "_blank"]
        assert reply["thinkingShown"] and not reply["thinkingOpen"]  # folded
        assert reply["thinking"] == canned.reasoning
        assert f"{canned.completion_tokens} tokens" in reply["meta"]

    if reply["code"]:  # the copy button copies the code block's text
        grant = {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
                 "origin": chat_server.url.rstrip("/")}  # fmt: skip
        page.send("Browser.grantPermissions", grant, session=None)
        page.click(".code-block .copy-code")
        page.wait_for("document.querySelector('.copy-code').textContent !== 'Copy'", "Copied")
        assert page.js("document.querySelector('.copy-code').textContent") == "Copied"
        assert page.js("navigator.clipboard.readText()") == reply["code"][0]

    # the second turn sends the whole conversation
    send_message(page, "And again?")
    page.wait_for(IDLE, "the second reply", timeout=20)
    sent = page.js("__spy.requests.filter(r => r.url.endsWith('/v1/chat/completions'))")
    roles = [m["role"] for m in sent[-1]["body"]["messages"]]
    assert roles == ["user", "assistant", "user"]
    if canned is not None:
        assert sent[-1]["body"]["messages"][1]["content"] == canned.content  # no reasoning

    if reply["thinkingShown"]:  # unfolded for the screenshot
        page.click(".msg.assistant details.thinking > summary")
    shot = page.screenshot(tmp_path / "chat_page.png")
    page.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                           "value": "dark"}]})  # fmt: skip
    dark = page.screenshot(tmp_path / "chat_page_dark.png")
    page.send("Emulation.setEmulatedMedia", {"features": []})
    print(f"screenshots: {shot} {dark}")


def test_stop_aborts_the_stream(page, chat_server):
    send_message(page, "Tell me a long story")
    page.wait_for("document.querySelector('.msg.assistant .content').textContent.length > 0",
                  "the first content")  # fmt: skip
    assert page.js(BUSY), "the reply finished before Stop could be pressed"
    page.click("#send")
    page.wait_for(IDLE, "Send after Stop", timeout=5)
    reply = last_reply(page)
    assert reply["error"] is None, reply["error"]
    assert "stopped" in reply["meta"]
    assert chat_server.disconnected.wait(5), "the server did not see the client go"
    if chat_server.canned is not None:
        assert len(reply["text"]) < len(chat_server.canned.content) / 2
    # the partial reply stays in the conversation
    send_message(page, "Go on")
    page.wait_for(IDLE, "the next reply", timeout=20)
    sent = page.js("__spy.requests.filter(r => r.url.endsWith('/v1/chat/completions'))")
    assert [m["role"] for m in sent[-1]["body"]["messages"]] == ["user", "assistant", "user"]


def test_errors_are_shown(page):
    # a 400 from the server: its {"error": {"message"}} is shown, the message can be sent again
    page.js("document.querySelector('#max-tokens').value = '0'")
    send_message(page, "Hi")
    page.wait_for(IDLE + " && document.querySelector('.msg.assistant .error')", "the error")
    error = last_reply(page)["error"]
    assert "HTTP 400" in error and "max_tokens" in error, error
    assert page.js("document.querySelector('.msg.user').classList.contains('unsent')")
    assert page.js("document.querySelector('#input').value") == "Hi"
    # a stream that ends without [DONE]
    page.js("document.querySelector('#max-tokens').value = ''; __spy.mode = 'cut'")
    page.js("document.querySelector('#input').value = ''")
    send_message(page, "Hi again")
    page.wait_for(IDLE + " && document.querySelectorAll('.msg.assistant').length === 2",
                  "the cut reply", timeout=20)  # fmt: skip
    reply = last_reply(page)
    assert reply["error"] and "cut" in reply["error"], reply
    assert reply["text"].strip()  # what came before the cut stays


def test_api_key_is_asked_once_and_sent(page):
    page.js("__spy.mode = 'key'")
    page.dialog_answer = "sekret"
    send_message(page, "Hi")
    page.wait_for(IDLE, "the reply", timeout=20)
    assert len(page.dialogs) == 1 and page.dialogs[0]["type"] == "prompt"
    assert last_reply(page)["error"] is None
    assert page.js("localStorage.getItem('hetero.chat.apiKey')") == "sekret"
    sent = page.js("__spy.requests.filter(r => r.url.endsWith('/v1/chat/completions'))")
    assert [r["headers"].get("Authorization") for r in sent] == [None, "Bearer sekret"]
    send_message(page, "Again")  # the stored key is sent, no new prompt
    page.wait_for(IDLE, "the second reply", timeout=20)
    assert len(page.dialogs) == 1
    sent = page.js("__spy.requests.filter(r => r.url.endsWith('/v1/chat/completions'))")
    assert sent[-1]["headers"].get("Authorization") == "Bearer sekret"
