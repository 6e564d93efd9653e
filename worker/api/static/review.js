// Review page behaviour: overlay toggle, study chat and admin re-run. The session cookie authenticates;
// the X-Requested-With header marks the request as coming from this page (CSRF guard on the server).
"use strict";

function postJson(url, body) {
  return fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Requested-With": "retinalgpt-review"},
    body: JSON.stringify(body),
  }).then(async (response) => {
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new Error(typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`);
    }
    return data;
  });
}

function addMessage(log, role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  item.textContent = text;
  log.appendChild(item);
  item.scrollIntoView({block: "nearest"});
  return item;
}

function setUpChat() {
  const chat = document.getElementById("chat");
  if (!chat) return;
  const form = document.getElementById("chat-form");
  const question = document.getElementById("chat-question");
  const send = document.getElementById("chat-send");
  const log = document.getElementById("chat-log");
  const history = [];
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!text) return;
    addMessage(log, "user", text);
    const pending = addMessage(log, "assistant pending", "…");
    send.disabled = true;
    postJson(`/api/studies/${encodeURIComponent(chat.dataset.study)}/chat`, {question: text, history: history.slice(-20)})
      .then((data) => {
        pending.className = "message assistant";
        pending.textContent = data.answer;
        history.push({role: "user", content: text}, {role: "assistant", content: data.answer});
        question.value = "";
      })
      .catch((error) => {
        pending.className = "message error";
        pending.textContent = `No answer: ${error.message}`;
      })
      .finally(() => { send.disabled = false; });
  });
}

function setUpOverlayToggle() {
  const toggle = document.getElementById("show-overlay");
  if (!toggle) return;
  toggle.addEventListener("change", () => {
    document.body.classList.toggle("hide-overlay", !toggle.checked);
  });
}

function setUpRerun() {
  const button = document.getElementById("rerun");
  if (!button) return;
  const status = document.getElementById("rerun-status");
  button.addEventListener("click", () => {
    button.disabled = true;
    postJson(`/api/studies/${encodeURIComponent(button.dataset.study)}/rerun`, {})
      .then((data) => { status.textContent = `Queued revision ${data.revision}.`; })
      .catch((error) => { status.textContent = `Not queued: ${error.message}`; button.disabled = false; });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpChat();
  setUpOverlayToggle();
  setUpRerun();
});
