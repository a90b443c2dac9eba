// The chat page of `hetero serve`: streams /v1/chat/completions (OpenAI's SSE format) into a
// conversation view. Plain browser JS, no build step; markdown.js renders the replies.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), empty: $("empty"), form: $("composer"), input: $("input"),
    send: $("send"), newChat: $("new-chat"), model: $("model"), system: $("system"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), forgetKey: $("forget-key"),
    status: $("status"),
  };
  const SETTINGS = "hetero.chat.settings";
  const API_KEY = "hetero.chat.apiKey";

  // localStorage can be missing or refuse writes (private windows, file://); the page still works
  const store = {
    get(key) { try { return localStorage.getItem(key); } catch { return null; } },
    set(key, value) {
      try {
        if (value == null) localStorage.removeItem(key); else localStorage.setItem(key, value);
      } catch { /* not kept */ }
    },
  };

  let history = []; // the conversation sent with every request: {role, content}
  let controller = null; // the AbortController of the reply in flight

  function setStatus(text, bad = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("bad", bad);
  }

  // ---- settings -------------------------------------------------------------------------------

  function readSettings() {
    try { return JSON.parse(store.get(SETTINGS)) || {}; } catch { return {}; }
  }

  function saveSettings() {
    store.set(SETTINGS, JSON.stringify({
      model: ui.model.value, system: ui.system.value,
      temperature: ui.temperature.value, max_tokens: ui.maxTokens.value,
    }));
  }

  const saved = readSettings();
  ui.system.value = saved.system || "";
  ui.temperature.value = saved.temperature ?? "";
  ui.maxTokens.value = saved.max_tokens ?? "";
  for (const el of [ui.model, ui.system, ui.temperature, ui.maxTokens]) {
    el.addEventListener("change", saveSettings);
    el.addEventListener("input", saveSettings);
  }
  ui.forgetKey.addEventListener("click", () => {
    store.set(API_KEY, null);
    setStatus("API key forgotten.");
  });

  // ---- HTTP -----------------------------------------------------------------------------------

  // fetch with the stored API key; a 401 asks for a key once (unless another request just
  // stored a new one) and retries with it
  async function apiFetch(path, init = {}) {
    for (let attempt = 0; ; attempt++) {
      const key = store.get(API_KEY);
      const headers = { ...(init.headers || {}) };
      if (key) headers.Authorization = "Bearer " + key;
      const resp = await fetch(path, { ...init, headers });
      if (resp.status !== 401 || attempt > 0) return resp;
      if (store.get(API_KEY) === key) {
        const entered = window.prompt(
          "This server needs an API key (sent as \"Authorization: Bearer <key>\"):", "");
        if (!entered || !entered.trim()) return resp;
        store.set(API_KEY, entered.trim());
      }
    }
  }

  // the message of a failed response: OpenAI's {"error": {"message"}} body, else its text
  async function errorMessage(resp) {
    let text = "";
    try { text = await resp.text(); } catch { /* no body */ }
    let message = "";
    try {
      const body = JSON.parse(text);
      const err = body && (body.error ?? body.detail);
      message = typeof err === "string" ? err : err && (err.message || JSON.stringify(err));
    } catch { /* not JSON */ }
    message = message || text.trim().slice(0, 500) || resp.statusText;
    return `HTTP ${resp.status}${message ? ": " + message : ""}`;
  }

  async function loadModels() {
    try {
      const resp = await apiFetch("/v1/models");
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const ids = ((await resp.json()).data || []).map((m) => m.id).filter(Boolean);
      ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (!ids.length) ui.model.append(new Option("(server default)", ""));
      if (saved.model && ids.includes(saved.model)) ui.model.value = saved.model;
    } catch (err) {
      ui.model.replaceChildren(new Option("(server default)", ""));
      setStatus("Could not list the models: " + err.message, true);
    }
  }

  // ---- the conversation view ------------------------------------------------------------------

  const nearBottom = () =>
    ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
  const toBottom = () => { ui.messages.scrollTop = ui.messages.scrollHeight; };

  function addMessage(role) {
    ui.empty.hidden = true;
    const el = document.createElement("article");
    el.className = "msg " + role;
    el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    el.innerHTML = '<div class="who" aria-hidden="true"></div>';
    el.firstChild.textContent = role === "user" ? "You" : "Assistant";
    ui.messages.append(el);
    return el;
  }

  function addUserMessage(text) {
    const el = addMessage("user");
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = text;
    el.append(body);
    toBottom();
    return el;
  }

  // the assistant's reply as it streams in; render() is cheap to call per delta (one per frame)
  function addReply() {
    const el = addMessage("assistant");
    el.insertAdjacentHTML("beforeend",
      '<details class="thinking" hidden><summary>Thinking…</summary>' +
      '<div class="thinking-body"></div></details>' +
      '<div class="content markdown pending"></div><div class="meta"></div>');
    const part = (sel) => el.querySelector(sel);
    const reply = { el, content: "", reasoning: "", frame: 0 };
    reply.render = () => {
      reply.frame = 0;
      const follow = nearBottom();
      if (reply.reasoning) {
        part(".thinking").hidden = false;
        part(".thinking-body").textContent = reply.reasoning;
      }
      part(".content").innerHTML = window.renderMarkdown(reply.content);
      if (follow) toBottom();
    };
    reply.schedule = () => { reply.frame ||= requestAnimationFrame(reply.render); };
    reply.finish = (meta, error, thoughtSeconds) => {
      if (reply.frame) cancelAnimationFrame(reply.frame);
      reply.render();
      part(".content").classList.remove("pending");
      if (thoughtSeconds != null) {
        part(".thinking > summary").textContent = `Thinking (${thoughtSeconds.toFixed(1)} s)`;
      }
      part(".meta").textContent = meta;
      if (error) {
        const box = document.createElement("div");
        box.className = "error";
        box.setAttribute("role", "alert");
        box.textContent = error;
        el.append(box);
      }
      if (nearBottom()) toBottom();
    };
    return reply;
  }

  ui.messages.addEventListener("click", async (event) => {
    const button = event.target.closest(".copy-code");
    if (!button) return;
    const text = button.closest(".code-block").querySelector("pre code").textContent;
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch { // no clipboard API outside secure contexts: copy through a selection
      const area = Object.assign(document.createElement("textarea"), { value: text });
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.append(area);
      area.select();
      try { ok = document.execCommand("copy"); } catch { ok = false; }
      area.remove();
    }
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });

  // ---- sending --------------------------------------------------------------------------------

  function setBusy(busy) {
    ui.send.textContent = busy ? "Stop" : "Send";
    ui.send.classList.toggle("stop", busy);
    ui.send.classList.toggle("primary", !busy);
    ui.send.setAttribute("aria-label", busy ? "Stop generating" : "Send message");
  }

  function requestBody() {
    const messages = [];
    if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
    messages.push(...history);
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (ui.model.value) body.model = ui.model.value;
    const temperature = parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  // calls onData(payload) for each server-sent event's data; resolves when the body ends
  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    const line = (text) => {
      if (text.endsWith("\r")) text = text.slice(0, -1);
      if (text === "") {
        if (data.length && onData(data.join("\n")) === false) return false;
        data = [];
      } else if (text.startsWith("data:")) {
        data.push(text.slice(text.startsWith("data: ") ? 6 : 5));
      } // comments (":") and other fields are ignored
      return true;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const more = line(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        if (!more) { reader.cancel().catch(() => {}); return; }
      }
    }
    if (buffer) line(buffer);
    line("");
  }

  function formatStats(s) {
    const parts = [];
    if (s.first != null) {
      const ttft = s.first - s.start;
      parts.push(ttft < 1000 ? `TTFT ${Math.round(ttft)} ms` : `TTFT ${(ttft / 1000).toFixed(2)} s`);
      const counted = s.usage?.completion_tokens;
      const tokens = counted ?? s.deltas;
      const span = (s.last - s.first) / 1000;
      // decode speed: the tokens after the first over the time from the first to the last
      const rate = tokens > 1 && span > 0 ? (tokens - 1) / span : tokens / ((s.last - s.start) / 1000);
      if (Number.isFinite(rate)) parts.push(`${rate.toFixed(1)} tok/s`);
      parts.push(counted != null ? `${tokens} tokens` : `~${tokens} tokens (counted deltas)`);
    }
    if (s.finish === "length") parts.push("hit max_tokens");
    if (s.stopped) parts.push("stopped");
    return parts.join(" · ");
  }

  async function send(text) {
    const convo = history; // "New chat" starts another array: this reply stays out of it
    convo.push({ role: "user", content: text });
    const userEl = addUserMessage(text);
    const reply = addReply();
    toBottom();
    const s = { start: performance.now(), first: null, last: null, thinkEnd: null, deltas: 0,
      usage: null, finish: null, done: false, stopped: false };
    let error = null;
    controller = new AbortController();
    setBusy(true);
    setStatus("");

    const onData = (data) => {
      if (data.trim() === "[DONE]") { s.done = true; return false; }
      let chunk;
      try { chunk = JSON.parse(data); } catch { return true; }
      if (chunk.error) {
        error = "Error: " + (chunk.error.message || JSON.stringify(chunk.error));
        return true;
      }
      const choice = (chunk.choices || []).find((c) => (c.index ?? 0) === 0);
      const delta = choice?.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (reasoning || delta.content) {
        const now = performance.now();
        s.first ??= now;
        s.last = now;
        s.deltas++;
        if (reasoning) reply.reasoning += reasoning;
        if (delta.content) {
          if (reply.reasoning && s.thinkEnd == null) s.thinkEnd = now;
          reply.content += delta.content;
        }
        reply.schedule();
      }
      if (choice?.finish_reason) s.finish = choice.finish_reason;
      if (chunk.usage) s.usage = chunk.usage;
      return true;
    };

    try {
      const resp = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!resp.ok) {
        error = await errorMessage(resp);
      } else {
        await readEvents(resp.body, onData);
        if (!s.done && !error) {
          error = "The stream was cut before it finished (no [DONE]); the reply may be incomplete.";
        }
      }
    } catch (err) {
      if (err.name === "AbortError") s.stopped = true;
      else if (s.first != null) error = "The stream was cut: " + err.message;
      else error = "The request failed: " + err.message;
    } finally {
      controller = null;
      setBusy(false);
    }

    const thought = reply.reasoning
      ? ((s.thinkEnd ?? s.last) - s.first) / 1000 : null;
    reply.finish(formatStats(s), error, thought);
    if (reply.content) {
      convo.push({ role: "assistant", content: reply.content });
    } else {
      // nothing to keep: drop the exchange from the conversation so it can be sent again
      convo.pop();
      userEl.classList.add("unsent");
      userEl.title = "Not part of the conversation: no reply came back";
      if (!ui.input.value && convo === history) ui.input.value = text;
    }
  }

  function stop() {
    if (controller) controller.abort();
  }

  function submit() {
    if (controller) { stop(); return; }
    const text = ui.input.value;
    if (!text.trim()) { ui.input.focus(); return; }
    ui.input.value = "";
    autosize();
    send(text);
    ui.input.focus();
  }

  function autosize() {
    ui.input.style.height = "auto";
    ui.input.style.height = ui.input.scrollHeight + 2 + "px";
  }

  ui.form.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  ui.input.addEventListener("input", autosize);
  ui.input.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) {
      return;
    }
    event.preventDefault();
    if (!controller) submit();
  });

  ui.newChat.addEventListener("click", () => {
    stop();
    history = [];
    ui.messages.querySelectorAll(".msg").forEach((el) => el.remove());
    ui.empty.hidden = false;
    setStatus("");
    ui.input.focus();
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) stop();
  });

  loadModels();
})();
