// The xmodal search page: plain JS against the service's own HTTP API (no framework, no CDN).
// The search lives in the URL (?q=...&index=...&mode=late&k=...&modalities=image,audio&filter=...&like=ID&lm=image),
// so a search can be shared, bookmarked and reloaded; opening such a URL runs it.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
};
const MODALITIES = ["text", "image", "audio"];
const state = { indexes: [], queryFile: null, results: [], index: null };

// --- the service ------------------------------------------------------------------------------------------------
class ServiceError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// An API key (XMODAL_API_KEYS), typed once into the page: kept for this tab only (sessionStorage), sent as a bearer
// token with every call. Media then load through fetch (an <img src> cannot carry a header) as blob URLs.
const KEY_STORE = "xmodal.apiKey";
const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";
const withKey = (options = {}) => {
  const key = apiKey();
  return key ? { ...options, headers: { ...(options.headers || {}), authorization: `Bearer ${key}` } } : options;
};

function askForKey(status) {
  const row = $("key-row");
  row.hidden = false;
  $("api-key").setAttribute("aria-invalid", status === 403 ? "true" : "false");
  $("api-key").focus();
}

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, withKey(options));
  } catch (err) {
    throw new ServiceError(0, "unreachable", `the service did not answer (${err.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body && body.error;
    if (response.status === 401 || response.status === 403) askForKey(response.status);
    throw new ServiceError(response.status, error ? error.code : "error",
      error ? error.message : `HTTP ${response.status} ${response.statusText}`);
  }
  return body;
}

const mediaUrl = (kind, index, id, extra = "") =>
  `/v1/indexes/${encodeURIComponent(index)}/${kind}?id=${encodeURIComponent(id)}${extra}`;

// An <img>/<audio> for a media URL: the URL itself, or with an API key the file fetched with it as a blob URL.
function mediaNode(tag, url, attrs) {
  if (!apiKey()) return el(tag, { ...attrs, src: url });
  const node = el(tag, attrs);
  fetch(url, withKey())
    .then((r) => (r.ok ? r.blob() : null))
    .then((blob) => { if (blob) node.src = URL.createObjectURL(blob); })
    .catch(() => {});
  return node;
}

// --- indexes ----------------------------------------------------------------------------------------------------
async function loadIndexes() {
  const body = await call("/v1/indexes");
  state.indexes = body.indexes;
  const select = $("index");
  select.replaceChildren();
  for (const idx of body.indexes) {
    select.append(el("option", { value: idx.name, text: `${idx.name} (${idx.items.toLocaleString()} items)` }));
  }
  for (const [name, reason] of Object.entries(body.refused || {})) {
    select.append(el("option", { value: name, disabled: true, title: reason, text: `${name} (refused)` }));
  }
  if (!body.indexes.length) showError("No index is served yet: build one with `xmodal index build` (see the README).");
}

function chooseIndex(name) {
  const known = state.indexes.find((i) => i.name === name);
  const idx = known || state.indexes.find((i) => i.name === "demo") || state.indexes[0] || null;
  state.index = idx;
  const select = $("index");
  if (name && !known) {
    // keep an unknown name from a URL, so the service's own message explains it
    if (![...select.options].some((o) => o.value === name)) select.append(el("option", { value: name, text: name }));
    select.value = name;
  } else if (idx) {
    select.value = idx.name;
  }
  const targets = $("targets");
  const checked = new Set([...targets.querySelectorAll("input:checked")].map((i) => i.value));
  targets.replaceChildren(el("legend", { text: "Targets" }));
  const available = idx ? idx.modalities : MODALITIES;
  for (const m of available) {
    const box = el("input", { type: "checkbox", name: "modality", value: m, checked: checked.size ? checked.has(m) : true });
    targets.append(el("label", {}, box, ` ${m}`));
  }
  const late = document.querySelector('input[name=mode][value=late]');
  late.disabled = Boolean(idx && !idx.late);
  late.parentElement.title = late.disabled ? "this index was built without --late: no token vectors" : "";
  if (late.disabled && late.checked) document.querySelector('input[name=mode][value=dense]').checked = true;
  $("index-info").textContent = idx
    ? `${idx.modalities.join(" · ")} · ${idx.model} · ${idx.faiss}${idx.late ? " · late" : ""} · v${idx.version}`
    : "";
}

// --- the form and the URL ---------------------------------------------------------------------------------------
function readForm() {
  const targets = [...document.querySelectorAll("#targets input:checked")].map((i) => i.value);
  const all = [...document.querySelectorAll("#targets input")].length;
  return {
    index: $("index").value,
    q: $("q").value.trim(),
    mode: document.querySelector("input[name=mode]:checked").value,
    k: $("k").value,
    modalities: targets.length && targets.length < all ? targets : [],
    filter: $("filter").value.trim(),
  };
}

function writeForm(params) {
  $("q").value = params.get("q") || "";
  $("k").value = params.get("k") || "12";
  $("filter").value = params.get("filter") || "";
  const mode = params.get("mode") === "late" ? "late" : "dense";
  document.querySelector(`input[name=mode][value=${mode}]`).checked = true;
  chooseIndex(params.get("index"));
  const wanted = (params.get("modalities") || "").split(",").filter(Boolean);
  for (const box of document.querySelectorAll("#targets input")) box.checked = !wanted.length || wanted.includes(box.value);
}

function urlFor(form, like) {
  const params = new URLSearchParams();
  if (like) {
    params.set("like", like.id);
    params.set("lm", like.modality);
  } else if (form.q) {
    params.set("q", form.q);
  }
  params.set("index", form.index);
  if (form.mode !== "dense") params.set("mode", form.mode);
  if (form.k && form.k !== "12") params.set("k", form.k);
  if (form.modalities.length) params.set("modalities", form.modalities.join(","));
  if (form.filter) params.set("filter", form.filter);
  return `/?${params}`;
}

// "count=2, kind=sound" or a JSON object; values that read as JSON (numbers, true, lists) are taken as such.
function parseFilter(text) {
  if (!text) return null;
  if (text.startsWith("{")) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new ServiceError(0, "bad_filter", `the filter is not valid JSON: ${err.message}`);
    }
    if (typeof value !== "object" || Array.isArray(value) || value === null) {
      throw new ServiceError(0, "bad_filter", "a JSON filter must be an object: {\"field\": value}");
    }
    return value;
  }
  const filter = {};
  for (const part of text.split(/[,&]/).map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new ServiceError(0, "bad_filter", `filter part "${part}" is not field=value`);
    const key = part.slice(0, at).trim();
    const raw = part.slice(at + 1).trim();
    let value = raw;
    try {
      value = JSON.parse(raw);
    } catch (_) { /* a plain string */ }
    if (key in filter) filter[key] = [].concat(filter[key], value);
    else filter[key] = value;
  }
  return filter;
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

const fileModality = (file) =>
  (file.type || "").startsWith("audio/") || /\.(wav|flac|ogg|oga|opus|mp3)$/i.test(file.name) ? "audio" : "image";

// --- searching --------------------------------------------------------------------------------------------------
let searchSeq = 0;

async function runSearch({ push = true, like = null } = {}) {
  const form = readForm();
  hideError();
  const seq = ++searchSeq;
  let query;
  let queryText = null;
  try {
    if (like) {
      const response = await fetch(mediaUrl("media", form.index, like.id, `&modality=${like.modality}`), withKey());
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new ServiceError(response.status, "media", body && body.error ? body.error.message : `HTTP ${response.status}`);
      }
      query = { [like.modality]: await readAsDataUrl(await response.blob()) };
    } else if (state.queryFile) {
      query = { [fileModality(state.queryFile)]: await readAsDataUrl(state.queryFile) };
    } else if (form.q) {
      query = { text: form.q };
      queryText = form.q;
    } else {
      showError("Type a query, or choose an image or a sound to search with.");
      return;
    }
    const body = { index: form.index, query, k: Number(form.k) || 12, mode: form.mode };
    if (form.modalities.length) body.modalities = form.modalities;
    const filter = parseFilter(form.filter);
    if (filter) body.filter = filter;
    if (form.mode === "late") body.late = { explain: true, heatmap: true };
    if (push) {
      const url = state.queryFile && !like ? urlFor({ ...form, q: "" }) : urlFor(form, like);
      if (url !== location.pathname + location.search) history.pushState(null, "", url);
    }
    setStatus("Searching…");
    $("results").setAttribute("aria-busy", "true");
    const out = await call("/v1/search", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (seq !== searchSeq) return; // a newer search has started
    render(out, queryText, Object.keys(query)[0]);
  } catch (err) {
    if (seq !== searchSeq) return;
    showError(err.message, err.status);
    $("results").replaceChildren();
    $("tokens").hidden = true;
    setStatus("");
  } finally {
    $("results").removeAttribute("aria-busy");
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1); // for tests and tools
  }
}

// --- results ----------------------------------------------------------------------------------------------------
function render(out, queryText, queryModality) {
  state.results = out.results;
  const list = $("results");
  list.replaceChildren(...out.results.map((r, i) => card(out.index, r, i)));
  const n = out.results.length;
  setStatus(`${n} result${n === 1 ? "" : "s"} · ${out.took_ms.toFixed(1)} ms · ${out.cached ? "from the cache" : "not cached"}`
    + ` · ${out.mode}${out.calibration ? ` · ${out.calibration} scores` : ""} · ${out.model} · version ${out.index_version}`);
  if (!n) setStatus("No result: try other words, other targets or no filter.");
  renderTokens(out.results, queryText, queryModality);
}

function card(index, r, position) {
  const media = r.media || [];
  const visualModality = r.modality === "image" || r.modality === "audio" ? r.modality : media[0];
  const item = el("li", { class: `card ${r.modality}`, "data-id": r.id, "data-modality": r.modality });
  if (visualModality === "image") {
    item.append(el("div", { class: "visual picture" },
      mediaNode("img", mediaUrl("thumbnail", index, r.id, "&size=256"), { alt: r.text || `image ${r.id}`, loading: "lazy", width: 256, height: 256 }),
      el("div", { class: "heat", hidden: true }),
      el("div", { class: "spot", hidden: true })));
  } else if (visualModality === "audio") {
    item.append(el("div", { class: "visual sound" },
      mediaNode("img", mediaUrl("waveform", index, r.id), { alt: `waveform of ${r.id}`, loading: "lazy", width: 480, height: 96 }),
      el("div", { class: "heat", hidden: true }),
      el("div", { class: "spot", hidden: true })));
    item.append(mediaNode("audio", mediaUrl("media", index, r.id, "&modality=audio"), { controls: true, preload: "none", "aria-label": `play ${r.id}` }));
  }
  if (r.text) item.append(el("p", { class: "caption", text: r.text }));
  const modalityBadge = el("span", { class: `badge ${r.modality.replace("+", " ")}`, text: r.modality });
  item.append(el("div", { class: "meta" },
    modalityBadge,
    el("code", { class: "id", text: r.id, title: "item id" }),
    el("span", { class: "score", title: "ranking score (calibrated when results mix modalities)", text: `score ${r.score.toFixed(3)}` }),
    el("span", { class: "sim", title: "raw similarity (cosine; late: MaxSim)", text: `sim ${r.similarity.toFixed(3)}` })));
  const meta = Object.entries(r.metadata || {});
  if (meta.length) {
    item.append(el("dl", { class: "metadata" }, ...meta.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: typeof v === "string" ? v : JSON.stringify(v) })])));
  }
  item.append(el("button", {
    type: "button",
    class: "like",
    "aria-label": `more like ${r.id}`,
    text: "More like this",
    onclick: () => moreLike(r, visualModality),
  }));
  item.dataset.position = String(position);
  return item;
}

// "More like this": a picture or a sound searches with its own file (by id, so the URL can say so); a text item with
// its text.
function moreLike(r, visualModality) {
  setQueryFile(null);
  if (visualModality) {
    $("q").value = "";
    runSearch({ like: { id: r.id, modality: visualModality } });
  } else {
    $("q").value = r.text || "";
    runSearch();
  }
  window.scrollTo({ top: 0 });
}

// Late interaction explained: each query token, and where its best match lies in each result.
// A text query's tokens are its words; a picture's, its patches; a sound's, its frames.
const TOKEN_NAMES = { image: "patch", audio: "frame" };

function renderTokens(results, queryText, queryModality) {
  const bar = $("tokens");
  const list = $("token-list");
  const first = results.find((r) => r.matches && r.matches.length);
  if (!first) {
    bar.hidden = true;
    list.replaceChildren();
    return;
  }
  const labels = new Map();
  for (const r of results) for (const m of r.matches || []) {
    if (!labels.has(m.query_token)) labels.set(m.query_token, m.query_text || `${TOKEN_NAMES[queryModality] || "token"} ${m.query_token}`);
  }
  list.replaceChildren(...[...labels.entries()].sort((a, b) => a[0] - b[0]).map(([i, label]) => {
    const show = () => highlight(i);
    return el("button", { type: "button", class: "token", "data-token": i, text: label, title: queryText ? "" : `a ${TOKEN_NAMES[queryModality] || "token"} of the query file`,
      onmouseenter: show, onfocus: show, onmouseleave: clearHighlight, onblur: clearHighlight });
  }));
  bar.hidden = false;
}

function highlight(token) {
  for (const b of document.querySelectorAll("#token-list .token")) b.classList.toggle("active", Number(b.dataset.token) === token);
  for (const item of document.querySelectorAll("#results .card")) {
    const r = state.results[Number(item.dataset.position)];
    const match = (r.matches || []).find((m) => m.query_token === token);
    const spot = item.querySelector(".spot");
    const heat = item.querySelector(".heat");
    const caption = item.querySelector(".caption");
    if (caption) caption.replaceChildren(r.text || "");
    if (spot) spot.hidden = true;
    if (heat) heat.hidden = true;
    if (!match) continue;
    const visual = item.querySelector(".visual");
    const shown = visual ? (visual.classList.contains("picture") ? "image" : "audio") : null;
    if (match.box && spot && match.modality === shown) {
      const [x0, y0, x1, y1] = match.box;
      Object.assign(spot.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
      spot.title = `${match.query_text || "token " + match.query_token} → ${match.where} (${match.similarity.toFixed(3)})`;
      const drawn = match.heat ? drawHeat(heat, match.heat, shown) : false;
      spot.classList.toggle("solo", !drawn);
      spot.hidden = false;
    } else if (match.chars && caption && r.text) {
      const [a, b] = match.chars;
      caption.replaceChildren(r.text.slice(0, a), el("mark", { text: r.text.slice(a, b), title: match.similarity.toFixed(3) }), r.text.slice(b));
    }
  }
}

// The query token's similarity to every patch (a grid over the thumbnail) or frame (strips over the waveform):
// the best stays clear, the rest is darkened by how much worse it matched. False when the tokens are no grid.
function drawHeat(layer, values, modality) {
  let cells = values;
  let columns = values.length;
  let rows = 1;
  if (modality === "image") {
    let side = Math.round(Math.sqrt(values.length));
    if (side * side !== values.length) {
      side = Math.round(Math.sqrt(values.length - 1));
      if (side * side !== values.length - 1) return false;
      cells = values.slice(1); // a class token first (CLIP ViT)
    }
    columns = rows = side;
  }
  const lo = Math.min(...cells);
  const span = Math.max(...cells) - lo || 1;
  layer.style.gridTemplateColumns = `repeat(${columns}, 1fr)`;
  layer.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  layer.replaceChildren(...cells.map((v) => {
    const cell = el("span", { title: v.toFixed(3) });
    cell.style.setProperty("--dim", (0.72 * (1 - (v - lo) / span)).toFixed(3));
    return cell;
  }));
  layer.hidden = false;
  return true;
}

function clearHighlight() {
  for (const b of document.querySelectorAll("#token-list .token")) b.classList.remove("active");
  for (const layer of document.querySelectorAll("#results .spot, #results .heat")) layer.hidden = true;
  for (const item of document.querySelectorAll("#results .card")) {
    const caption = item.querySelector(".caption");
    const r = state.results[Number(item.dataset.position)];
    if (caption && r) caption.replaceChildren(r.text || "");
  }
}

// --- status and errors ------------------------------------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function showError(message, status) {
  const box = $("error");
  box.replaceChildren(el("strong", { text: status ? `Error ${status}: ` : "Error: " }), message);
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// --- the query file ---------------------------------------------------------------------------------------------
function setQueryFile(file) {
  state.queryFile = file;
  const box = $("query-file");
  const image = $("query-file-image");
  const audio = $("query-file-audio");
  for (const media of [image, audio]) {
    if (media.src) URL.revokeObjectURL(media.src);
    media.removeAttribute("src");
    media.hidden = true;
  }
  if (!file) {
    box.hidden = true;
    $("file").value = "";
    return;
  }
  const target = fileModality(file) === "audio" ? audio : image;
  target.src = URL.createObjectURL(file);
  target.hidden = false;
  $("query-file-name").textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
  box.hidden = false;
  $("q").value = "";
}

function wireFileInput() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) {
      setQueryFile(e.target.files[0]);
      runSearch();
    }
  });
  $("clear-file").addEventListener("click", () => {
    setQueryFile(null);
    $("q").focus();
  });
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) {
      setQueryFile(file);
      runSearch();
    }
  });
}

// --- start ------------------------------------------------------------------------------------------------------
function fromUrl() {
  const params = new URLSearchParams(location.search);
  writeForm(params);
  const like = params.get("like");
  if (like) {
    const modality = params.get("lm") === "audio" ? "audio" : "image";
    return runSearch({ push: false, like: { id: like, modality } });
  }
  if (params.get("q")) return runSearch({ push: false });
  state.results = [];
  $("results").replaceChildren();
  $("tokens").hidden = true;
  setStatus("");
  return null;
}

async function start() {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("q").value.trim()) setQueryFile(null);
    runSearch();
  });
  $("index").addEventListener("change", () => chooseIndex($("index").value));
  $("key-row").hidden = !apiKey();
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    hideError();
    try {
      await loadIndexes();
      chooseIndex($("index").value);
      if ($("q").value.trim() || state.queryFile) await runSearch({ push: false });
    } catch (err) {
      showError(err.message, err.status);
    }
  });
  wireFileInput();
  window.addEventListener("popstate", () => {
    setQueryFile(null);
    fromUrl();
  });
  try {
    await loadIndexes();
  } catch (err) {
    showError(err.message, err.status);
  }
  await fromUrl();
  document.body.dataset.ready = "true";
}

start();
