"""The chat page against the real `hetero serve` on the demo model, in headless Chromium: a
streamed answer (screenshot kept as a test artifact), and Stop aborting the request so its KV
pages come back (seen in /metrics)."""

from __future__ import annotations

import time

import pytest

from hetero.demo import demo_dir
from hetero.testing.browser import IDLE, Browser, find_chromium, last_reply, send_message
from hetero.testing.server import ServerProcess

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)"),
    pytest.mark.skipif(demo_dir() is None, reason="the demo weights are not in hetero/demo/"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess([], tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    browser = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
    browser.load(server.url + "/")
    browser.wait_for("!!window.renderMarkdown && document.readyState === 'complete'", "the page")
    models = "[...document.querySelectorAll('#model option')].some(o => o.value === 'demo')"
    browser.wait_for(models, "the model list from /v1/models")
    yield browser
    browser.close()


def set_max_tokens(page: Browser, n: int) -> None:
    page.js(f"""(() => {{ const el = document.querySelector('#max-tokens');
        el.value = '{n}'; el.dispatchEvent(new Event('input', {{bubbles: true}}));
        el.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")


def test_a_streamed_answer_from_the_demo_model(page, server, tmp_path):
    set_max_tokens(page, 40)
    send_message(page, "def read_lines(path):")
    page.wait_for(IDLE, "the reply to finish", timeout=120)
    reply = last_reply(page)
    assert reply["text"].strip() and reply["error"] is None, reply
    assert "tok/s" in reply["meta"] and "TTFT" in reply["meta"], reply["meta"]
    print(f"screenshot: {page.screenshot(tmp_path / 'chat_page_live.png')}")
    assert server.metric("hetero:kv_pages_used") == 0


def test_stop_aborts_the_request_and_frees_its_pages(page, server):
    aborted = 'hetero:request_success_total{finished_reason="abort"}'
    before = _labelled(server, aborted)
    set_max_tokens(page, 1500)
    text = "[...document.querySelectorAll('.msg.assistant')].at(-1).querySelector('.content')"
    long = f"{text}.innerText.length > 20"
    for _ in range(5):  # (the model samples: a reply may end at once; then ask again)
        send_message(page, "class Stack:")
        page.wait_for(f"({long}) || ({IDLE})", "some text, or the reply's end", timeout=60)
        if page.js(f"({long}) && !({IDLE})"):
            break
        page.wait_for(IDLE, "the page to be idle")
    else:
        pytest.fail("five replies in a row ended before 20 characters")
    page.click("#send")  # Stop
    page.wait_for(IDLE, "the page to stop")
    deadline = time.monotonic() + 10  # (the engine takes the abort between two steps)
    while time.monotonic() < deadline and server.metric("hetero:kv_pages_used") > 0:
        time.sleep(0.1)
    assert _labelled(server, aborted) == before + 1
    assert server.metric("hetero:kv_pages_used") == 0


def _labelled(server, sample: str) -> float:
    _, body = server.get("/metrics")
    for line in body.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0
