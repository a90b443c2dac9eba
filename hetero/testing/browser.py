"""Headless Chromium driven over its DevTools protocol through a pipe (`--remote-debugging-pipe`:
commands on fd 3, replies and events on fd 4, each a JSON message ended by a NUL byte), so tests
of the chat page need no websocket client; and helpers that act on the page as a user does."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def find_chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    env = os.environ.get("HETERO_CHROMIUM")
    return shutil.which(env) if env else next(filter(None, map(shutil.which, names)), None)


class Browser:
    """Headless Chromium with one page; `send` runs a CDP command on it and returns its result.
    JavaScript dialogs (the API-key prompt) are answered with `dialog_answer` and recorded."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends go to fds >= 10 first, so putting them on 3 and 4 clobbers nothing
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--disable-translate",
            "--mute-audio", "--hide-scrollbars", "--window-size=1100,860",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", trampoline, *map(str, high), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=high,
            )  # fmt: skip
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._write_lock = threading.Lock()
        self._cv = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._closed = False
        self.events: list[dict] = []
        self.dialogs: list[dict] = []
        self.dialog_answer = ""
        self.session: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        targets = self.send("Target.getTargets", session=None)["targetInfos"]
        page = next((t["targetId"] for t in targets if t["type"] == "page"), None)
        if page is None:
            page = self.send("Target.createTarget", {"url": "about:blank"}, None)["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": page, "flatten": True}, None)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")

    def _post(self, method: str, params: dict | None, session: str | None) -> int:
        with self._write_lock:
            self._next_id += 1
            msg = {"id": self._next_id, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
            return self._next_id

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self._from_chrome, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            *messages, buffer = (buffer + data).split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if msg.get("method") == "Page.javascriptDialogOpening":
                    self.dialogs.append(msg["params"])
                    answer = {"accept": True, "promptText": self.dialog_answer}
                    self._post("Page.handleJavaScriptDialog", answer, msg.get("sessionId"))
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cv.notify_all()
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    _PAGE = object()

    def send(self, method: str, params: dict | None = None, session=_PAGE, timeout=20.0) -> dict:
        mid = self._post(method, params, self.session if session is Browser._PAGE else session)
        deadline = time.monotonic() + timeout
        with self._cv:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    why = "Chromium exited" if self._closed else f"no reply in {timeout} s"
                    raise RuntimeError(f"{method}: {why}; its log ends:\n{tail}")
                self._cv.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, since: int, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for event in self.events[since:]:
                    if event.get("method") == method:
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {method} in {timeout} s")
                self._cv.wait(left)

    # ---- page helpers ----

    def js(self, expression: str):
        """The value of a JavaScript expression (promises awaited); page exceptions raise."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})  # fmt: skip
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise AssertionError(f"JavaScript failed: {text}\nin: {expression}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.js(f"Boolean({expression})"):
                return
            if time.monotonic() > deadline:
                body = self.js("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {what}; the page shows:\n{body}")
            time.sleep(0.03)

    def load(self, url: str) -> None:
        mark = len(self.events)
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", mark)

    def reload(self) -> None:
        mark = len(self.events)
        self.send("Page.reload")
        self.wait_event("Page.loadEventFired", mark)

    def type(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def key(self, key: str, code: int, text: str = "", shift: bool = False) -> None:
        base = {"key": key, "code": key, "windowsVirtualKeyCode": code,
                "nativeVirtualKeyCode": code, "modifiers": 8 if shift else 0}  # fmt: skip
        self.send("Input.dispatchKeyEvent", {**base, "type": "keyDown", "text": text})
        self.send("Input.dispatchKeyEvent", {**base, "type": "keyUp"})

    def enter(self, shift: bool = False) -> None:
        self.key("Enter", 13, "\r", shift)

    def click(self, selector: str) -> None:
        box = self.js(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        assert box, f"nothing matches {selector!r}"
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})  # fmt: skip

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=None, timeout=5)
        except RuntimeError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


BUSY = "document.querySelector('#send').textContent.trim() === 'Stop'"
IDLE = "document.querySelector('#send').textContent.trim() === 'Send'"


def send_message(page: Browser, text: str) -> None:
    count = "document.querySelectorAll('.msg.user').length"
    before = page.js(count)
    page.click("#input")
    page.type(text)
    page.enter()
    page.wait_for(f"{count} > {before}", "the message to be sent")


def last_reply(page: Browser) -> dict:
    return page.js("""(() => {
        const el = [...document.querySelectorAll('.msg.assistant')].at(-1);
        const content = el.querySelector('.content');
        const thinking = el.querySelector('details.thinking');
        return {
            text: content.innerText, html: content.innerHTML,
            code: [...content.querySelectorAll('pre > code')].map(c => c.textContent),
            thinkingShown: !thinking.hidden, thinkingOpen: thinking.open,
            thinking: el.querySelector('.thinking-body').textContent,
            meta: el.querySelector('.meta').textContent,
            error: el.querySelector('.error')?.textContent ?? null,
        };
    })()""")
