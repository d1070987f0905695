// The chat page: a conversation over /v1/chat/completions (streamed), with documents attached to a question.
// Attachments become text through POST /extract and go into the user message they were attached to, so a
// follow-up question resends the same prefix and the server's prefix cache answers it without a new prefill.
"use strict";

const $ = (id) => document.getElementById(id);
const IGNORED = /(^|\/)(\.git|node_modules|__pycache__|\.venv|venv|dist|build|\.mypy_cache|\.pytest_cache)\//;
const state = { key: sessionStorage.getItem("megactx-key") || "", model: null, maxLen: 0, history: [],
                attachments: [], controller: null, attachmentTokens: 0 };

function notice(text, error = false) {
  $("notice").textContent = text;
  $("notice").className = error ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) { headers.Authorization = `Bearer ${state.key}`; }
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("key-dialog").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    const card = models.data[0];
    state.model = card.id;
    state.maxLen = card.max_model_len;
    $("model").textContent = `${card.id} · context ${card.max_model_len.toLocaleString()} tokens`;
    $("key-dialog").hidden = true;
  } catch (e) {
    $("model").textContent = "not connected";
    notice(e.message, true);
  }
}

$("key-save").onclick = () => {
  state.key = $("key").value.trim();
  sessionStorage.setItem("megactx-key", state.key);
  notice("");
  connect();
};

function attachmentText() {
  return state.attachments.map((a) => `### ${a.name}\n${a.text}`).join("\n\n");
}

function userContent(question) {
  const docs = attachmentText();
  return docs ? `${docs}\n\n${question}` : question;
}

async function countTokens(messages) {
  const r = await api("/tokenize", { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify({ model: state.model, messages }) });
  return (await r.json()).count;
}

function budget() {
  return state.maxLen - Number($("max-tokens").value || 1);
}

async function showAttachments() {
  $("clear-attachments").hidden = state.attachments.length === 0;
  if (!state.attachments.length) { $("attachments").textContent = ""; state.attachmentTokens = 0; return; }
  const names = state.attachments.map((a) => a.name).join(", ");
  const tokens = await countTokens([...state.history, { role: "user", content: attachmentText() }]);
  state.attachmentTokens = tokens;
  $("attachments").textContent = `${names}: ${tokens.toLocaleString()} tokens of ${state.maxLen.toLocaleString()}`;
  if (tokens > budget()) {
    notice(`The conversation with these attachments is ${tokens.toLocaleString()} tokens; the model's context ` +
           `is ${state.maxLen.toLocaleString()} (${Number($("max-tokens").value)} kept for the answer). ` +
           `Remove an attachment or attach less.`, true);
  }
}

async function attach(files) {
  const skipped = [];
  for (const file of files) {
    const name = file.webkitRelativePath || file.name;
    if (IGNORED.test(name)) { skipped.push(name); continue; }
    try {
      const r = await api(`/extract?name=${encodeURIComponent(name)}`, {
        method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: await file.arrayBuffer() });
      const doc = await r.json();
      state.attachments.push({ name, text: doc.text });
    } catch (e) {
      if (files.length > 1 && file.webkitRelativePath) { skipped.push(name); continue; }  // a folder's binaries
      notice(`Cannot attach ${name}: ${e.message}`, true);
      return;
    }
  }
  notice(skipped.length ? `Skipped ${skipped.length} binary or tool file(s).` : "");
  await showAttachments();
}

$("files").onchange = (e) => { attach([...e.target.files]); e.target.value = ""; };
$("folder").onchange = (e) => { attach([...e.target.files]); e.target.value = ""; };
$("clear-attachments").onclick = () => { state.attachments = []; notice(""); showAttachments(); };

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.innerHTML = `<div class="who">${role === "user" ? "you" : "model"}</div><div class="body"></div>` +
                  `<div class="meta"></div>`;
  div.querySelector(".body").innerHTML = renderMarkdown(text);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function showPrefill(line) {
  // ": prefill DONE/TOTAL (C cached) R tok/s, ETA S s"
  const m = line.match(/prefill (\d+)\/(\d+)(?: \((\d+) cached\))?(?: (\d+) tok\/s, ETA (\d+) s)?/);
  if (!m) { return; }
  const [done, total, cached] = [Number(m[1]), Number(m[2]), Number(m[3] || 0)];
  $("prefill-box").hidden = false;
  $("prefill").value = done / total;
  let text = `prompt ${done.toLocaleString()} / ${total.toLocaleString()} tokens`;
  if (cached) { text += ` (${cached.toLocaleString()} from the cache)`; }
  if (m[4]) { text += ` · ${m[4]} tok/s · ETA ${m[5]} s`; }
  $("prefill-text").textContent = text;
  $("prefill-box").dataset.last = text;  // what the bar last said, kept after it hides
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send() {
  const question = $("question").value.trim();
  if (!question || !state.model) { return; }
  const message = { role: "user", content: userContent(question) };
  const messages = [...state.history, message];
  let tokens;
  try { tokens = await countTokens(messages); } catch (e) { notice(e.message, true); return; }
  if (tokens > budget()) {
    notice(`This question with its attachments is ${tokens.toLocaleString()} tokens; the model's context is ` +
           `${state.maxLen.toLocaleString()}. Remove an attachment or lower max tokens.`, true);
    return;
  }
  const shown = state.attachments.length ? `${question}\n\n*(${state.attachments.map((a) => a.name).join(", ")})*`
                                         : question;
  addMessage("user", shown);
  $("question").value = "";
  state.attachments = [];
  showAttachments();
  notice("");
  const reply = addMessage("assistant", "");
  const body = reply.querySelector(".body");
  let answer = "";
  state.controller = new AbortController();
  busy(true);
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: state.controller.signal,
      body: JSON.stringify({ model: state.model, messages, stream: true, stream_options: { include_usage: true },
                             temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) }) });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) { break; }
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith(":")) { showPrefill(line); continue; }
          if (!line.startsWith("data: ") || line === "data: [DONE]") { continue; }
          const data = JSON.parse(line.slice(6));
          if (data.error) { throw new Error(data.error.message); }
          if (data.usage) {
            const cached = (data.usage.prompt_tokens_details || {}).cached_tokens || 0;
            reply.querySelector(".meta").textContent = `prompt ${data.usage.prompt_tokens.toLocaleString()} tokens` +
              ` (${cached.toLocaleString()} from the cache) · ${data.usage.completion_tokens} generated`;
          }
          const delta = data.choices && data.choices[0] && data.choices[0].delta;
          if (delta && delta.content) {
            $("prefill-box").hidden = true;
            answer += delta.content;
            body.innerHTML = renderMarkdown(answer);
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
    state.history.push(message, { role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      reply.querySelector(".meta").textContent = "stopped";
      if (answer) { state.history.push(message, { role: "assistant", content: answer }); }
    } else {
      notice(e.message, true);
    }
  } finally {
    $("prefill-box").hidden = true;
    state.controller = null;
    busy(false);
  }
}

$("send").onclick = send;
$("stop").onclick = () => { if (state.controller) { state.controller.abort(); } };
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
connect();
