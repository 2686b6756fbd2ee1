// Chat page: send the conversation to /api/chat and stream the reply (newline-delimited JSON) into
// one column, or two with the base model answering the same messages beside it.
"use strict";
(function () {
  const form = document.getElementById("chat-form");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const columns = $("columns");
  let history = { model: [], base: [] };
  let busy = false;

  function sides() { return $("compare-base").checked ? ["model", "base"] : ["model"]; }

  function reset() {
    history = { model: [], base: [] };
    for (const col of columns.querySelectorAll(".column .messages")) col.textContent = "";
    $("chat-error").textContent = "";
    const compare = $("compare-base").checked;
    $("col-base").hidden = !compare;
    columns.classList.toggle("compare", compare);
  }

  function bubble(side, role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    $("col-" + side).querySelector(".messages").appendChild(div);
    return div;
  }

  async function send(text) {
    busy = true;
    $("send").disabled = true;
    $("chat-error").textContent = "";
    const active = sides();
    const replies = {};
    for (const side of active) {
      history[side].push({ role: "user", content: text });
      bubble(side, "user", text);
      replies[side] = bubble(side, "assistant", "");
      replies[side].dataset.state = "streaming";
    }
    const body = {
      target: $("target").value, system: $("system").value, messages: history.model,
      compare: active.length > 1, base_messages: history.base,
      max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
    };
    const finish = (side, state, message) => {
      const div = replies[side];
      if (!div || div.dataset.state !== "streaming") return;
      div.dataset.state = state;
      if (state === "done") history[side].push({ role: "assistant", content: div.textContent });
      else { history[side].pop(); div.textContent = "error: " + message; }
    };
    try {
      const r = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(body) });
      if (!r.ok) {
        const detail = await r.text();
        let message = detail;
        try { message = JSON.parse(detail).detail; } catch (e) { /* plain text */ }
        for (const side of active) finish(side, "error", message);
        return;
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (!line.trim()) continue;
          const item = JSON.parse(line);
          if (item.text !== undefined) replies[item.side].textContent += item.text;
          else if (item.status !== undefined) $("col-" + item.side).querySelector(".side-status").textContent = item.status;
          else if (item.done) finish(item.side, "done");
          else if (item.error !== undefined) finish(item.side, "error", item.error);
        }
      }
      for (const side of active) finish(side, "error", "the answer stopped before it ended");
    } catch (e) {
      for (const side of active) finish(side, "error", String(e));
    } finally {
      busy = false;
      $("send").disabled = false;
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("message").value;
    if (busy || !text.trim()) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });
  $("reset").addEventListener("click", reset);
  $("target").addEventListener("change", reset);
  $("compare-base").addEventListener("change", reset);
  reset();
})();
