// loraswap playground: plain modern JavaScript, no dependencies, no build step.
// Keys typed into the page live in this module's memory only: never in a cookie, localStorage,
// sessionStorage or the URL. Every call is relative to the <base> the server wrote, so the page
// works behind a path prefix (--root-path).

const $ = (id) => document.getElementById(id);
const keys = { api: "", admin: "" };
let running = [];  // AbortControllers of the answers streaming now
let slotTimer = null;

// ---- HTTP -----------------------------------------------------------------------------------
function authHeaders(kind) {
  const token = kind === "admin" ? keys.admin : keys.api;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return new ApiError(response.status, message);
}

async function api(path, { method = "GET", json, form, kind = "api", signal } = {}) {
  const init = { method, headers: authHeaders(kind), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function banner(message) {
  const node = $("banner");
  node.hidden = !message;
  node.textContent = message || "";
}

// ---- models -----------------------------------------------------------------------------------
async function loadModels() {
  let data;
  try {
    data = await api("v1/models");
  } catch (error) {
    if (error.status === 401) banner("This server needs an API key: type it above (it stays in this tab only).");
    else banner(`Cannot list the models: ${error.message}`);
    return;
  }
  banner("");
  const list = $("model-list");
  const checked = new Set([...list.querySelectorAll("input:checked")].map((box) => box.value));
  const first = list.children.length === 0;
  list.replaceChildren();
  for (const model of data.data) {
    const isBase = !model.parent;
    const box = el("input", { type: "checkbox", value: model.id, checked: first || checked.has(model.id) });
    box.dataset.base = isBase ? "1" : "";
    box.dataset.scalable = model.features && model.features.scalable ? "1" : "";
    const label = el("label", { class: "model", "data-model": model.id }, box, ` ${model.id}`);
    if (isBase) label.append(el("span", { class: "tag", text: "base" }));
    list.append(label);
  }
  list.dataset.loads = String(Number(list.dataset.loads || 0) + 1);  // lets a test wait for a fresh list
}

// ---- compare --------------------------------------------------------------------------------
function settings() {
  const number = (id) => Number($(id).value);
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    prompt: $("prompt").value,
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: Math.max(1, Math.floor(number("max-tokens"))),
    seed: Math.max(0, Math.floor(number("seed"))),
    sameSeed: $("same-seed").checked,
    loraScale: number("lora-scale"),
  };
}

function targets() {
  const out = [...$("model-list").querySelectorAll("input:checked")].map((box) => ({
    model: box.value, base: box.dataset.base === "1", scalable: box.dataset.scalable === "1",
  }));
  const mix = $("mix").value.trim();
  if (mix) out.push({ model: mix, base: false, scalable: false, mix: true });
  return out;
}

function requestBody(target, index, s) {
  const body = {
    model: target.model, temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens,
    seed: s.sameSeed ? s.seed : s.seed + index,
  };
  if (s.mode === "chat") body.messages = [{ role: "user", content: s.prompt }];
  else body.prompt = s.prompt;
  if (s.loraScale !== 1 && target.scalable) body.lora_scale = s.loraScale;
  return body;
}

function routeOf(s) {
  return s.mode === "chat" ? "v1/chat/completions" : "v1/completions";
}

function column(target) {
  const text = el("div", { class: "answer" });
  const stats = el("div", { class: "stats" });
  const node = el("article", { class: "column", "data-model": target.model },
    el("h3", { text: target.model }), text, stats);
  $("columns").append(node);
  return { node, text, stats };
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function stream(target, index, s, view) {
  const controller = new AbortController();
  running.push(controller);
  const body = { ...requestBody(target, index, s), stream: true, stream_options: { include_usage: true } };
  const start = performance.now();
  let first = null;
  let finish = null;
  let tokens = null;
  view.node.dataset.state = "running";
  try {
    const response = await fetch(routeOf(s), {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...authHeaders("api") }, body: JSON.stringify(body),
    });
    if (!response.ok) throw await errorOf(response);
    for await (const event of sseEvents(response)) {
      if (event.error) throw new ApiError(500, event.error.message);
      if (event.usage) tokens = event.usage.completion_tokens;
      for (const choice of event.choices || []) {
        const piece = s.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (piece) {
          if (first === null) first = performance.now();
          view.text.textContent += piece;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const end = performance.now();
    const ttft = first === null ? null : (first - start) / 1000;
    const rate = tokens && first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
    view.stats.textContent = [
      ttft === null ? "no text" : `first token ${ttft.toFixed(2)} s`,
      rate === null ? null : `${rate.toFixed(1)} tok/s`,
      tokens === null ? null : `${tokens} tokens`,
      `finish: ${finish || "none"}`,
    ].filter(Boolean).join(" · ");
    view.node.dataset.state = "done";
    view.node.dataset.finish = finish || "";
  } catch (error) {
    view.node.dataset.state = "error";
    view.stats.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    view.node.classList.add("failed");
  } finally {
    running = running.filter((c) => c !== controller);
  }
}

function stopAll() {
  for (const controller of running) controller.abort();
  running = [];
}

async function compare(event) {
  event.preventDefault();
  stopAll();
  $("columns").replaceChildren();
  const s = settings();
  const chosen = targets();
  if (!chosen.length) {
    banner("Choose at least one model (or type a mix).");
    return;
  }
  banner("");
  await Promise.all(chosen.map((target, i) => stream(target, i, s, column(target))));
}

// ---- request as code ------------------------------------------------------------------------
function baseUrl() {
  return new URL("v1", document.baseURI).href;
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function asCurl() {
  const s = settings();
  const auth = keys.api ? ' -H "Authorization: Bearer $LORASWAP_API_KEY"' : "";
  return targets().map((target, i) =>
    `curl -s ${new URL(routeOf(s), document.baseURI).href} -H 'Content-Type: application/json'${auth} \\\n` +
    `  -d ${shellQuote(JSON.stringify(requestBody(target, i, s)))}`).join("\n\n");
}

function asPython() {
  const s = settings();
  const lines = [
    "import os", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl())}, api_key=os.environ.get("LORASWAP_API_KEY", "unused"))`,
  ];
  targets().forEach((target, i) => {
    const body = requestBody(target, i, s);
    const extra = body.lora_scale !== undefined ? `, extra_body={"lora_scale": ${body.lora_scale}}` : "";
    const common = `model=${JSON.stringify(body.model)}, temperature=${body.temperature}, top_p=${body.top_p}, ` +
      `max_tokens=${body.max_tokens}, seed=${body.seed}${extra}`;
    if (s.mode === "chat") {
      lines.push(`reply = client.chat.completions.create(${common},`,
        `    messages=[{"role": "user", "content": ${JSON.stringify(s.prompt)}}])`,
        "print(reply.choices[0].message.content)");
    } else {
      lines.push(`reply = client.completions.create(${common}, prompt=${JSON.stringify(s.prompt)})`,
        "print(reply.choices[0].text)");
    }
  });
  return lines.join("\n");
}

async function showSnippet(text) {
  const node = $("snippet");
  node.hidden = false;
  node.textContent = text;
  try {
    await navigator.clipboard.writeText(text);
    node.dataset.copied = "1";
  } catch (_) {
    node.dataset.copied = "";  // no clipboard (not a secure context): the text is shown to copy by hand
  }
}

// ---- slots and tiers ------------------------------------------------------------------------
async function refreshSlots() {
  let ready;
  try {
    const response = await fetch("ready");
    ready = await response.json();
  } catch (error) {
    $("slot-summary").textContent = `cannot read /ready: ${error.message}`;
    return;
  }
  const slots = ready.slots;
  const grid = $("slots");
  if (!slots) {
    grid.replaceChildren(el("p", { class: "note", text: "This server has no LoRA slots (--max-loras 0)." }));
  } else {
    const bySlot = new Map(Object.entries(slots.resident).map(([key, slot]) => [slot, key]));
    grid.replaceChildren(...slots.references.map((refs, slot) => {
      const key = bySlot.get(slot);
      const pinned = key !== undefined && slots.pinned.includes(key);
      return el("div", { class: `slot${key ? " used" : ""}${pinned ? " pinned" : ""}`, "data-slot": String(slot),
                         "data-adapter": key ? key.split("@")[0] : "" },
        el("div", { class: "slot-id", text: `slot ${slot}` }),
        el("div", { class: "slot-adapter", text: key ? key.split("@")[0] : "empty" }),
        el("div", { class: "slot-version", text: key && key.includes("@") ? key.split("@")[1].slice(0, 12) : "" }),
        el("div", { class: "slot-rows", text: `${refs} running row${refs === 1 ? "" : "s"}${pinned ? " · pinned" : ""}` }));
    }));
    $("slot-summary").textContent =
      `${slots.loads} loads · ${slots.evictions} evictions · ${slots.hits} hits · waiting for a slot: ` +
      `${slots.waiting_adapters.length ? slots.waiting_adapters.map((k) => k.split("@")[0]).join(", ") : "none"}`;
  }
  const kv = ready.kv_cache || {};
  const cache = ready.adapter_cpu_cache || {};
  const facts = [["status", ready.status], ["running", ready.running], ["waiting", ready.waiting],
    ["generated tokens", ready.generated_tokens], ["KV blocks used", `${kv.blocks_used ?? "-"} / ${kv.blocks_total ?? "-"}`],
    ["adapter CPU cache", `${cache.hits ?? 0} hits, ${cache.misses ?? 0} misses`]];
  $("engine").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v ?? "-") })]));
  await refreshTiers();
}

// Every adapter's state from the admin API: {adapters} or {error}.
async function adminAdapters() {
  try {
    return { adapters: (await api("admin/adapters", { kind: "admin" })).adapters };
  } catch (error) {
    return { error };
  }
}

async function refreshTiers() {
  const { adapters, error } = await adminAdapters();
  if (error) {
    $("tiers-note").textContent = `Tiers need the admin API: ${error.message}`;
    $("tiers").replaceChildren();
    return;
  }
  $("tiers-note").textContent = "";
  const tiers = { slot: [], cpu: [], disk: [] };
  for (const a of adapters) (tiers[a.tier] || (tiers[a.tier] = [])).push(a.name);
  $("tiers").replaceChildren(...Object.entries(tiers).map(([tier, names]) =>
    el("div", { class: "tier", "data-tier": tier }, el("h4", { text: { slot: "in a slot", cpu: "CPU cache", disk: "disk" }[tier] || tier }),
      el("div", { text: names.length ? names.join(", ") : "-" }))));
}

// ---- managing adapters ----------------------------------------------------------------------
let dropped = [];

function showDropped() {
  $("drop-files").textContent = dropped.map((f) => `${f.name} (${f.size} bytes)`).join(", ");
}

function takeFiles(files) {
  for (const file of files) {
    dropped = dropped.filter((f) => f.name !== file.name);
    dropped.push(file);
  }
  showDropped();
}

function result(message, ok) {
  const node = $("manage-result");
  node.textContent = message;
  node.className = `result ${ok ? "ok" : "error"}`;
}

async function upload(event) {
  event.preventDefault();
  const name = $("upload-name").value.trim();
  const form = new FormData();
  for (const file of dropped) form.append(file.name, file, file.name);
  try {
    const out = await api(`admin/adapters/${encodeURIComponent(name)}`, { method: "PUT", form, kind: "admin" });
    result(`${out.name}: version ${String(out.version).slice(0, 12)}${out.replaced ? " (replaced the previous one)" : ""}`, true);
    dropped = [];
    showDropped();
  } catch (error) {
    result(`Refused: ${error.message}`, false);
  }
  await refreshAdmin();
  await loadModels();
}

async function fromPath(event) {
  event.preventDefault();
  const name = $("path-name").value.trim();
  try {
    const out = await api(`admin/adapters/${encodeURIComponent(name)}`,
      { method: "PUT", json: { path: $("path-value").value.trim() }, kind: "admin" });
    result(`${out.name}: version ${String(out.version).slice(0, 12)}`, true);
  } catch (error) {
    result(`Refused: ${error.message}`, false);
  }
  await refreshAdmin();
  await loadModels();
}

async function act(name, action) {
  const path = `admin/adapters/${encodeURIComponent(name)}`;
  try {
    if (action === "delete") {
      if (!window.confirm(`Delete ${name} and every version of it?`)) return;
      await api(path, { method: "DELETE", kind: "admin" });
    } else if (action === "pin" || action === "load") {
      await api(`${path}/load`, { method: "POST", json: { pin: action === "pin" }, kind: "admin" });
    } else {
      await api(`${path}/unload`, { method: "POST", kind: "admin" });
    }
    result(`${name}: ${action} done`, true);
  } catch (error) {
    result(`${name}: ${error.message}`, false);
  }
  await refreshAdmin();
  await loadModels();
}

async function refreshAdmin() {
  const { adapters, error } = await adminAdapters();
  if (error) {
    $("manage-note").textContent = error.status === 401 || error.status === 403
      ? `Read-only: ${error.message}. Type the admin token above to manage adapters (it stays in this tab only).`
      : `Cannot reach the admin API: ${error.message}`;
    $("manage-tools").hidden = true;
    return;
  }
  $("manage-note").textContent = "";
  $("manage-tools").hidden = false;
  const rows = adapters.map((a) => {
    const buttons = el("td", {},
      ...["load", "pin", "unload", "delete"].map((action) => el("button", {
        type: "button", class: "small", text: action, onclick: () => act(a.name, action), "data-action": action,
      })));
    return el("tr", { "data-adapter": a.name },
      el("td", { text: a.name }), el("td", { text: String(a.version).slice(0, 12) }), el("td", { text: a.tier }),
      el("td", { text: a.slot ?? "-" }), el("td", { text: a.pinned ? "yes" : "no" }), el("td", { text: String(a.requests) }),
      buttons);
  });
  document.querySelector("#adapters tbody").replaceChildren(...rows);
}

// ---- wiring ---------------------------------------------------------------------------------
function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  clearInterval(slotTimer);
  slotTimer = null;
  if (view === "slots") {
    refreshSlots();
    slotTimer = setInterval(refreshSlots, 1000);
  }
  if (view === "manage") refreshAdmin();
}

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("api-key").addEventListener("input", (e) => { keys.api = e.target.value.trim(); });
  $("api-key").addEventListener("change", loadModels);
  $("admin-token").addEventListener("input", (e) => { keys.admin = e.target.value.trim(); });
  $("admin-token").addEventListener("change", refreshAdmin);
  $("refresh-models").addEventListener("click", loadModels);
  $("compare-form").addEventListener("submit", compare);
  $("stop").addEventListener("click", stopAll);
  $("copy-curl").addEventListener("click", () => showSnippet(asCurl()));
  $("copy-python").addEventListener("click", () => showSnippet(asPython()));
  $("upload-form").addEventListener("submit", upload);
  $("path-form").addEventListener("submit", fromPath);
  $("upload-files").addEventListener("change", (e) => takeFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeFiles(e.dataTransfer.files);
  });
  loadModels();
}

init();
