// Review page behaviour: overlay toggle, study chat, admin re-run and clinician sign-off. The session cookie authenticates;
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

// Sign-off: missed lesions are drawn by dragging on an image; the box is normalised to the displayed image
// (0-1, origin top-left) as the API expects, and shown in the overlay as a dashed rectangle.
const missed = [];

function setUpDrawing() {
  document.querySelectorAll("figure.fundus.drawable").forEach((figure) => {
    const img = figure.querySelector("img");
    const svg = figure.querySelector("svg.overlay");
    const card = figure.closest(".image-card");
    const box = svg.viewBox.baseVal;
    let start = null;
    let rect = null;
    const point = (event) => {
      const r = img.getBoundingClientRect();
      return [Math.min(Math.max((event.clientX - r.left) / r.width, 0), 1),
              Math.min(Math.max((event.clientY - r.top) / r.height, 0), 1)];
    };
    const corners = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
    const show = (c) => {
      rect.setAttribute("x", c[0] * box.width); rect.setAttribute("y", c[1] * box.height);
      rect.setAttribute("width", (c[2] - c[0]) * box.width); rect.setAttribute("height", (c[3] - c[1]) * box.height);
    };
    figure.addEventListener("mousedown", (event) => {
      event.preventDefault();
      start = point(event);
      rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      rect.setAttribute("class", "missed");
      svg.appendChild(rect);
      show(corners(start, start));
    });
    figure.addEventListener("mousemove", (event) => { if (start) show(corners(start, point(event))); });
    window.addEventListener("mouseup", (event) => {  // also when the drag ends outside the image
      if (!start) return;
      const c = corners(start, point(event)).map((v) => Math.round(v * 10000) / 10000);
      start = null;
      if (c[2] - c[0] < 0.005 || c[3] - c[1] < 0.005) { rect.remove(); return; }  // a click, not a box
      const type = card.querySelector(".missed-type").value;
      missed.push({sop_instance_uid: figure.dataset.sop, type: type, box: c});
      const count = card.querySelectorAll("svg .missed").length;
      card.querySelector(".missed-count").textContent = `${count} missed lesion${count === 1 ? "" : "s"} drawn`;
    });
  });
}

function signOffBody(section, decision) {
  const body = {revision: Number(section.dataset.revision), decision: decision};
  const comment = document.getElementById("signoff-comment").value.trim();
  if (comment) body.comment = comment;
  if (decision === "confirm") return body;
  const grades = new Map();
  document.querySelectorAll("select.grade").forEach((select) => {
    const key = `${select.dataset.eye}/${select.dataset.condition}`;
    if (select.value !== "" && select.value !== select.dataset.ai && !grades.has(key)) {
      grades.set(key, {eye: select.dataset.eye, condition: select.dataset.condition, grade: Number(select.value)});
    }
  });
  body.grades = [...grades.values()];
  body.lesions = [];
  document.querySelectorAll("fieldset.signoff-image").forEach((fieldset) => {
    fieldset.querySelectorAll("select.lesion-verdict").forEach((select) => {
      body.lesions.push({sop_instance_uid: fieldset.dataset.sop, index: Number(select.dataset.index),
                         verdict: select.value});
    });
  });
  body.missed = missed.slice();
  const referral = document.getElementById("signoff-referral");
  if (referral.value !== referral.dataset.ai) body.referral = referral.value;
  return body;
}

function setUpSignOff() {
  const section = document.getElementById("signoff");
  if (!section) return;
  setUpDrawing();
  const status = document.getElementById("signoff-status");
  const buttons = section.querySelectorAll("button");
  const sign = (decision) => {
    buttons.forEach((b) => { b.disabled = true; });
    postJson(`/api/studies/${encodeURIComponent(section.dataset.study)}/signoff`, signOffBody(section, decision))
      .then((data) => {
        const what = data.changed ? `${data.changes.length} correction(s)` : "confirmed";
        status.textContent = `Signed as revision ${data.revision} (${what}); the results are being re-issued.`;
      })
      .catch((error) => {
        status.textContent = `Not signed: ${error.message}`;
        buttons.forEach((b) => { b.disabled = false; });
      });
  };
  document.getElementById("signoff-confirm").addEventListener("click", () => sign("confirm"));
  document.getElementById("signoff-correct").addEventListener("click", () => sign("correct"));
}

document.addEventListener("DOMContentLoaded", () => {
  setUpChat();
  setUpOverlayToggle();
  setUpRerun();
  setUpSignOff();
});
