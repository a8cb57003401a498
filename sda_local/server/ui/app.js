// sda-local's chat page: plain DOM, no framework, no third-party code. Model text only ever goes through
// textContent (never innerHTML), and the server's Content-Security-Policy allows no inline script.
"use strict";

const STORE = "sda-local/conversations";
const CURRENT = "sda-local/current";
const KEY = "sda-local/api-key"; // sessionStorage: forgotten when the browser session ends
const SHADE_JS = 0.3; // JS divergence (nats) shaded at full strength

const $ = (id) => document.getElementById(id);
let conversations = load();
let currentId = stored(CURRENT);
let running = []; // AbortControllers of the answer(s) streaming now

function stored(key) {
  try {
    return localStorage.getItem(key);
  } catch (e) { // storage disabled: the page still works, it only forgets on reload
    return null;
  }
}

function wellFormed(conv) {
  return conv && typeof conv.id === "string" && Array.isArray(conv.messages) && conv.messages.every((m) =>
    m && (m.role === "user" ? typeof m.content === "string"
                            : m.role === "assistant" && Array.isArray(m.answers) && m.answers.length > 0));
}

function load() {
  try {
    const data = JSON.parse(stored(STORE) || "[]");
    return Array.isArray(data) ? data.filter(wellFormed) : [];
  } catch (e) {
    return [];
  }
}

function save() {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      localStorage.setItem(STORE, JSON.stringify(conversations));
      if (currentId) localStorage.setItem(CURRENT, currentId);
      return;
    } catch (e) {
      // Full (per-token figures are large): keep the text, drop the figures of the other conversations.
      for (const conv of conversations) {
        if (conv.id === currentId) continue;
        for (const m of conv.messages) if (m.answers) for (const a of m.answers) a.tokens = null;
      }
    }
  }
  $("server-status").textContent = "this browser's storage is full or disabled: conversations are not kept";
}

function current() {
  let conv = conversations.find((c) => c.id === currentId);
  if (!conv) {
    conv = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat", messages: [] };
    conversations.unshift(conv);
    currentId = conv.id;
  }
  return conv;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  let key = null;
  try { key = sessionStorage.getItem(KEY); } catch (e) { /* storage disabled */ }
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// -- the server -----------------------------------------------------------------------------------------
async function connect() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    $("server-status").textContent = "the server cannot be reached";
    return;
  }
  if (response.status === 401) {
    $("key-panel").hidden = false;
    $("server-status").textContent = "this server needs its API key";
    return;
  }
  if (!response.ok) {
    $("server-status").textContent = "the server answered " + response.status + " (still loading?)";
    setTimeout(connect, 2000);
    return;
  }
  $("key-panel").hidden = true;
  $("server-status").textContent = "";
  const model = (await response.json()).data[0];
  $("model-name").textContent = model.id;
  const caps = model.sda || {};
  const align = $("align");
  for (const name of caps.presets || []) align.appendChild(option(name, name));
  align.appendChild(option("custom", "your own instruction…"));
  const modes = $("temperature-mode");
  for (const mode of caps.temperature_modes || []) modes.appendChild(option(mode, mode));
  if (caps.default_temperature_mode) modes.value = caps.default_temperature_mode;
  if (caps.max_strength) $("strength").max = String(Math.min(caps.max_strength, 4));
  $("judge-choice").options[0].textContent = caps.judge ? "judge: " + caps.judge : "server's judge (none set)";
  document.body.dataset.ready = "true";
}

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

// -- requests ---------------------------------------------------------------------------------------------
function alignment() {
  const choice = $("align").value;
  if (!choice) return null;
  if (choice === "custom") return $("align-text").value.trim() || null;
  return choice;
}

function arms() {
  const align = alignment();
  if (!align) return [{ label: "Answer", sda: null }];
  const sda = { align: align, temperature_mode: $("temperature-mode").value, token_stats: true };
  if ($("amplifier").value === "strength") sda.strength = parseFloat($("strength").value);
  else sda.judge = $("judge-choice").value;
  const out = [];
  if ($("compare").checked) {
    // prompting alone: the instruction in the prompt, a = 0, the base temperature
    out.push({ label: "Prompting alone", sda: { align: align, strength: 0, temperature_mode: "fixed", token_stats: true } });
  }
  out.push({ label: "SDA", sda: sda });
  return out;
}

function history(conv) {
  const out = [];
  for (const m of conv.messages) {
    if (m.role === "user") out.push({ role: "user", content: m.content });
    else {
      const last = m.answers[m.answers.length - 1];
      out.push({ role: "assistant", content: last.content });
    }
  }
  return out;
}

async function send(text) {
  const conv = current();
  const messages = history(conv).concat([{ role: "user", content: text }]);
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  const seed = parseInt($("seed").value, 10);
  const maxTokens = parseInt($("max-tokens").value, 10);
  const reply = { role: "assistant", answers: [] };
  conv.messages.push(reply);
  const plan = arms();
  for (const arm of plan) {
    reply.answers.push({ label: arm.label, content: "", tokens: arm.sda ? [] : null, judging: null, sda: null,
                         finish: null, error: null });
  }
  save();
  renderAll();
  const views = document.querySelectorAll("#messages .message.assistant:last-child .answer");
  setRunning(true);
  await Promise.all(plan.map((arm, i) => {
    const body = { messages: messages, stream: true };
    if (Number.isFinite(seed)) body.seed = seed;
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    if (arm.sda) body.sda = arm.sda;
    return stream(body, reply.answers[i], views[i]);
  }));
  setRunning(false);
  save();
  renderAll(); // what was put off while it streamed (a shading toggle, another conversation)
}

async function stream(body, answer, view) {
  const controller = new AbortController();
  running.push(controller);
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                           body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      let message = "the server answered " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      if (response.status === 401) $("key-panel").hidden = false;
      fail(answer, view, message);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue; // ": keep-alive" comments and the like
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          onChunk(JSON.parse(data), answer, view);
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      answer.finish = "stopped";
      renderMeta(answer, view);
    } else {
      fail(answer, view, String(e.message || e));
    }
  } finally {
    running = running.filter((c) => c !== controller);
  }
}

function onChunk(chunk, answer, view) {
  if (chunk.error) {
    fail(answer, view, chunk.error.message);
    return;
  }
  const choice = chunk.choices && chunk.choices[0];
  if (choice && choice.delta) {
    const delta = choice.delta;
    if (delta.reasoning_content) {
      answer.judging = answer.judging || { text: "" };
      answer.judging.text += delta.reasoning_content;
      renderJudging(answer, view);
    }
    const text = delta.content || "";
    const tokens = answer.tokens && chunk.sda && chunk.sda.tokens ? chunk.sda.tokens : [];
    if (text || tokens.length) {
      answer.content += text;
      // a chunk's text is its tokens' texts, then at most a tail without a token (the last bytes held back)
      const covered = tokens.map((t) => t.text).join("");
      if (tokens.length) {
        answer.tokens.push(...tokens);
        appendTokens(view.querySelector(".text"), tokens);
      }
      const rest = text.startsWith(covered) ? text.slice(covered.length) : (tokens.length ? "" : text);
      if (rest) {
        if (answer.tokens) answer.tokens.push({ text: rest, js: null, temperature: null, prompt_top: null });
        view.querySelector(".text").append(rest);
      }
    }
  }
  if (choice && choice.finish_reason) {
    answer.finish = choice.finish_reason;
    if (chunk.sda) {
      answer.sda = chunk.sda;
      if (answer.judging) renderJudging(answer, view);
    }
    renderMeta(answer, view);
  }
}

function fail(answer, view, message) {
  answer.error = message;
  renderMeta(answer, view);
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.dataset.running = on ? "true" : "false";
}

function stop() {
  for (const controller of running) controller.abort(); // the server cancels the generation at its next step
}

// -- rendering ---------------------------------------------------------------------------------------------
function shade(span, token) {
  if (token.js === null || token.js === undefined) return; // text without a token of its own
  span.dataset.js = String(token.js);
  span.dataset.temperature = String(token.temperature);
  let tip = "JS " + Number(token.js).toFixed(4) + " nats · T " + Number(token.temperature).toFixed(3);
  if (token.prompt_top !== null && token.prompt_top !== token.text) {
    tip += " · prompting alone ranked first: " + JSON.stringify(token.prompt_top);
  }
  span.title = tip;
  if ($("shading").checked) {
    const alpha = Math.min(1, Math.max(0, token.js) / SHADE_JS) * 0.85;
    span.style.backgroundColor = "rgba(255, 140, 0, " + alpha.toFixed(3) + ")";
  }
}

function appendTokens(container, tokens) {
  for (const token of tokens) {
    if (token.js === null || token.js === undefined) {
      container.append(token.text);
      continue;
    }
    const span = el("span", "tok", token.text);
    shade(span, token);
    container.appendChild(span);
  }
}

function renderJudging(answer, view) {
  let block = view.querySelector("details.judging");
  if (!block) {
    block = el("details", "judging");
    block.appendChild(el("summary"));
    block.appendChild(el("pre"));
    view.insertBefore(block, view.querySelector(".text"));
  }
  const report = answer.sda;
  let summary = "Judging…";
  if (report && report.amplifier !== undefined) {
    block.dataset.amplifier = String(report.amplifier);
    summary = "Judging: " + (report.score !== null && report.score !== undefined ? "score " +
      Number(report.score).toPrecision(3) + ", " : "") + "a = " + Number(report.amplifier).toPrecision(3);
  }
  block.querySelector("summary").textContent = summary;
  block.querySelector("pre").textContent = answer.judging.text;
}

function renderMeta(answer, view) {
  const meta = view.querySelector(".meta");
  meta.textContent = "";
  meta.classList.toggle("error", Boolean(answer.error));
  if (answer.error) {
    meta.textContent = "error: " + answer.error;
    return;
  }
  const parts = [];
  if (answer.finish) parts.push(answer.finish === "stopped" ? "stopped" : "finish: " + answer.finish);
  if (answer.sda && answer.sda.amplifier !== undefined) parts.push("a = " + Number(answer.sda.amplifier).toPrecision(3));
  if (answer.sda && answer.sda.mean_js !== undefined && answer.sda.mean_js !== null) {
    parts.push("mean JS " + Number(answer.sda.mean_js).toFixed(4));
  }
  meta.textContent = parts.join(" · ");
  view.dataset.finish = answer.finish || "";
}

function renderAnswer(answer) {
  const view = el("div", "answer");
  view.appendChild(el("h4", null, answer.label));
  const text = el("div", "text");
  view.appendChild(text);
  view.appendChild(el("div", "meta"));
  if (answer.tokens && answer.tokens.length) appendTokens(text, answer.tokens);
  else text.textContent = answer.content;
  if (answer.judging) renderJudging(answer, view);
  renderMeta(answer, view);
  return view;
}

function renderAll() {
  if (running.length) return; // the streams write into the nodes on screen: redraw once they end
  const list = $("conversations");
  list.textContent = "";
  for (const conv of conversations) {
    const item = el("li", conv.id === currentId ? "current" : "");
    item.appendChild(el("span", null, conv.title));
    const remove = el("button", "delete", "×");
    remove.title = "delete this conversation";
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      conversations = conversations.filter((c) => c.id !== conv.id);
      if (currentId === conv.id) currentId = conversations.length ? conversations[0].id : null;
      save();
      renderAll();
    });
    item.appendChild(remove);
    item.addEventListener("click", () => { currentId = conv.id; save(); renderAll(); });
    list.appendChild(item);
  }
  const box = $("messages");
  box.textContent = "";
  const conv = conversations.find((c) => c.id === currentId);
  if (!conv) return;
  for (const m of conv.messages) {
    if (m.role === "user") {
      box.appendChild(el("div", "message user", m.content));
    } else {
      const message = el("div", "message assistant");
      const answers = el("div", "answers");
      for (const answer of m.answers) answers.appendChild(renderAnswer(answer));
      message.appendChild(answers);
      box.appendChild(message);
    }
  }
  box.scrollTop = box.scrollHeight;
}

// -- wiring ----------------------------------------------------------------------------------------------
function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running.length) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => { currentId = null; current(); save(); renderAll(); });
  $("align").addEventListener("change", () => { $("align-text").hidden = $("align").value !== "custom"; });
  $("amplifier").addEventListener("change", () => {
    const fixed = $("amplifier").value === "strength";
    $("strength").hidden = !fixed;
    $("strength-value").hidden = !fixed;
    $("judge-choice").hidden = fixed;
  });
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("shading").addEventListener("change", renderAll);
  $("save-key").addEventListener("click", () => {
    sessionStorage.setItem(KEY, $("api-key").value);
    $("api-key").value = "";
    connect();
  });
}

wire();
renderAll();
connect();
