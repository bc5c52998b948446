// The search page: wires the form, the URL, the grid and the viewer to the API.

import { ApiError, Client, KeyStore, Unreachable } from "./api.js";
import {
  language,
  pickLanguage,
  setLanguage,
  storedLanguage,
  t,
  translatePage,
} from "./i18n.js";
import { apiFilters, DEFAULT_K, emptyQuery, fromUrl, sameQuery, toUrl } from "./query.js";
import { fileName, ResultsGrid } from "./results.js";
import { Viewer } from "./viewer.js";

const TYPING_PAUSE_MS = 300;
const STATUS_POLL_MS = 15000;

const $ = (selector) => document.querySelector(selector);

const ui = {
  form: $("#search-form"),
  q: $("#q"),
  file: $("#file"),
  dropZone: $("#drop-zone"),
  queryImage: $("#query-image"),
  queryImagePreview: $("#query-image-preview"),
  queryImageName: $("#query-image-name"),
  queryImageClear: $("#query-image-clear"),
  labelField: $("#label-field"),
  label: $("#label"),
  prefix: $("#prefix"),
  from: $("#from"),
  to: $("#to"),
  takenFrom: $("#taken-from"),
  takenTo: $("#taken-to"),
  camera: $("#camera"),
  k: $("#k"),
  message: $("#message"),
  status: $("#status"),
  results: $("#results"),
  indexStatus: $("#index-status"),
  modelWarning: $("#model-warning"),
  keyPanel: $("#key-panel"),
  keyForm: $("#key-form"),
  keyInput: $("#api-key"),
  keyForget: $("#key-forget"),
  language: $("#language"),
};

const keys = new KeyStore();
const client = new Client(keys);

const state = {
  query: emptyQuery(),
  image: null, // {file, url}: the uploaded query image; it cannot live in the URL
  index: null, // the last /index answer
  search: null, // AbortController of the search in flight
  typingTimer: 0,
  composing: false, // an input method (pinyin, ...) is composing text in the query box
  // What the status line, the index status and the message say, as functions that render the
  // text: a switch of language renders them again.
  statusText: null,
  indexStatusText: null,
  messageText: null,
};

// ---------------------------------------------------------------------------------------------
// Messages: one at a time, in a role=alert region; the status line is polite. `text` and an
// action's `label` are functions returning the text in the current language.

function showMessage(kind, text, { code = "", action = null } = {}) {
  // The same message again (a poll, a retyped query) is left alone: an alert region would
  // announce it anew to screen reader users each time.
  const same = !ui.message.hidden && ui.message.dataset.code === code;
  if (same && ui.message.querySelector("p")?.textContent === text()) return;
  ui.message.hidden = false;
  ui.message.className = `message ${kind}`;
  ui.message.dataset.kind = kind;
  ui.message.dataset.code = code;
  state.messageText = { text, label: action?.label ?? null };
  const body = document.createElement("p");
  ui.message.replaceChildren(body);
  if (action) {
    const button = document.createElement("button");
    button.type = "button";
    button.addEventListener("click", action.run);
    ui.message.append(button);
  }
  renderMessage();
}

function renderMessage() {
  if (ui.message.hidden || !state.messageText) return;
  ui.message.querySelector("p").textContent = state.messageText.text();
  const button = ui.message.querySelector("button");
  if (button) button.textContent = state.messageText.label();
}

function clearMessage(kind = null) {
  if (kind && ui.message.dataset.kind !== kind) return;
  ui.message.hidden = true;
  ui.message.dataset.kind = "";
  ui.message.replaceChildren();
  state.messageText = null;
}

function setStatus(text) {
  state.statusText = text;
  ui.status.textContent = text ? text() : "";
}

function showNoIndex() {
  showMessage("empty", () => t("message.noIndex"), { code: "no_index" });
}

function askForKey(error) {
  ui.keyPanel.open = true;
  const text =
    error.code === "invalid_api_key"
      ? () => t("message.keyRefused", { message: error.message })
      : () => t("message.keyNeeded");
  showMessage("error", text, { code: error.code });
  ui.keyInput.focus();
}

function showFailure(error, { upload = false } = {}) {
  const message = error.message; // the server's words stay as it sent them
  if (error instanceof Unreachable) {
    const origin = new URL(document.baseURI).origin;
    showMessage("error", () => t("message.unreachable", { origin }), {
      code: "unreachable",
      action: { label: () => t("message.retry"), run: retry },
    });
    setIndexStatus(() => t("index.unreachable"));
  } else if (error instanceof ApiError && error.status === 401) {
    askForKey(error);
  } else if (error instanceof ApiError && upload) {
    showMessage("error", () => t("message.uploadRejected", { message }), { code: error.code });
  } else if (error instanceof ApiError) {
    showMessage("error", () => t("message.searchFailed", { message }), { code: error.code });
  } else {
    showMessage("error", () => t("message.pageError", { message }), { code: "page_error" });
  }
}

// ---------------------------------------------------------------------------------------------
// Index status

function setIndexStatus(text) {
  state.indexStatusText = text;
  const shown = text();
  if (ui.indexStatus.textContent !== shown) ui.indexStatus.textContent = shown; // live region
}

function describeModel(model) {
  if (!model) return t("index.noModel");
  const weights = String(model.pretrained ?? "").split(/[\\/]/).pop();
  return weights ? `${model.name} (${weights})` : model.name;
}

function indexIsEmpty() {
  // Degraded with every shard corrupt serves nothing, but "no index yet" would be untrue.
  return state.index !== null && state.index.live_vector_count === 0 && !state.index.degraded;
}

// `report`: also explain a failure in the message region (not on the quiet background poll,
// which must not steal focus every few seconds; it only reports a lost server).
async function refreshIndexStatus({ report = true } = {}) {
  try {
    const info = await client.index();
    const wasEmpty = indexIsEmpty();
    state.index = info;
    document.body.dataset.index =
      info.live_vector_count === 0 && !info.degraded ? "empty" : "ready";
    document.body.dataset.degraded = info.degraded ? "true" : "false";
    ui.modelWarning.hidden = !info.random_weights; // results that look real but mean nothing
    const count = info.live_vector_count;
    const corrupt = info.corrupt_shards ?? [];
    setIndexStatus(
      () =>
        t("index.status", {
          generation: info.generation,
          images: t("index.images", { count }),
          model: describeModel(info.model),
        }) +
        (corrupt.length
          ? t("index.degraded", {
              count: corrupt.length,
              missing: t("index.images", { count: info.unserved_vector_count ?? 0 }),
            })
          : ""),
    );
    if (indexIsEmpty()) showNoIndex();
    else {
      clearMessage("empty");
      if (["unreachable", "missing_api_key", "invalid_api_key"].includes(ui.message.dataset.code))
        clearMessage();
      if (wasEmpty) runQuery(state.query, { history: "none" });
    }
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.code === "no_catalog") {
      // Nothing indexed here yet: the server is up and says so; the poll sees the first index.
      state.index = { live_vector_count: 0, degraded: false };
      document.body.dataset.index = "empty";
      setIndexStatus(() => t("index.none"));
      showNoIndex();
      return true;
    }
    document.body.dataset.index = "unknown";
    const message = error.message;
    if (error instanceof Unreachable) setIndexStatus(() => t("index.unreachable"));
    else if (error instanceof ApiError && error.status === 401) {
      setIndexStatus(() => t("index.keyNeeded"));
    } else setIndexStatus(() => t("index.unavailable", { message }));
    if (report || error instanceof Unreachable) showFailure(error);
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Labels (issue 5): the filter appears only when the server has label sets.

async function loadLabelOptions() {
  let sets;
  try {
    sets = await client.labelSets();
  } catch {
    sets = null; // status and searches report the reason
  }
  const keep = ui.label.querySelector('option[value=""]');
  ui.label.replaceChildren(keep);
  if (!sets || sets.length === 0) {
    ui.labelField.hidden = !state.query.label;
    addMissingLabelOption(state.query);
    ui.label.value = state.query.label ? labelValue(state.query.set, state.query.label) : "";
    return;
  }
  for (const set of sets) {
    const counts = await client.labelCounts(set.name).catch(() => null);
    const group = document.createElement("optgroup");
    group.label = set.name;
    for (const label of set.labels ?? []) {
      const option = document.createElement("option");
      option.value = labelValue(set.name, label);
      const n = counts?.counts?.[label];
      option.textContent = n === undefined ? label : `${label} (${n})`;
      group.append(option);
    }
    ui.label.append(group);
  }
  ui.labelField.hidden = false;
  addMissingLabelOption(state.query);
  ui.label.value = state.query.label ? labelValue(state.query.set, state.query.label) : "";
}

function labelValue(set, label) {
  return JSON.stringify([set || "", label]);
}

function addMissingLabelOption(query) {
  if (!query.label) return;
  const value = labelValue(query.set, query.label);
  if ([...ui.label.options].some((option) => option.value === value)) return;
  const option = document.createElement("option");
  option.value = value;
  option.textContent = query.set ? `${query.label} (${query.set})` : query.label;
  ui.label.append(option);
  ui.labelField.hidden = false;
}

// ---------------------------------------------------------------------------------------------
// The form <-> the query

function readForm() {
  const query = emptyQuery();
  query.q = ui.q.value.trim();
  query.similar = state.query.similar;
  query.k = Number.parseInt(ui.k.value, 10) || DEFAULT_K;
  if (ui.label.value) {
    const [set, label] = JSON.parse(ui.label.value);
    query.set = set;
    query.label = label;
  }
  query.prefix = ui.prefix.value.trim();
  query.from = ui.from.value;
  query.to = ui.to.value;
  query.takenFrom = ui.takenFrom.value;
  query.takenTo = ui.takenTo.value;
  query.camera = ui.camera.value.trim();
  return query;
}

function fillForm(query) {
  ui.q.value = query.q;
  if (![...ui.k.options].some((option) => option.value === String(query.k))) {
    ui.k.append(new Option(String(query.k)));
  }
  ui.k.value = String(query.k);
  addMissingLabelOption(query);
  ui.label.value = query.label ? labelValue(query.set, query.label) : "";
  ui.prefix.value = query.prefix;
  ui.from.value = query.from;
  ui.to.value = query.to;
  ui.takenFrom.value = query.takenFrom;
  ui.takenTo.value = query.takenTo;
  ui.camera.value = query.camera;
}

function setQueryImage(file) {
  if (state.image) URL.revokeObjectURL(state.image.url);
  state.image = file ? { file, url: URL.createObjectURL(file) } : null;
  ui.queryImage.hidden = !file;
  ui.dropZone.classList.toggle("has-image", Boolean(file));
  ui.queryImagePreview.classList.remove("broken");
  if (file) {
    ui.queryImagePreview.src = state.image.url;
    ui.queryImagePreview.alt = t("image.alt", { name: file.name });
    ui.queryImageName.textContent = file.name;
  } else {
    ui.queryImagePreview.removeAttribute("src");
    ui.file.value = "";
  }
}

// ---------------------------------------------------------------------------------------------
// History: typing replaces the entry it started, so Back skips half-typed queries.

function record(query, history) {
  if (history === "none") return;
  const url = toUrl(query);
  const entry = { typing: history === "typing", image: Boolean(state.image && !query.q) };
  const current = window.history.state;
  if (history === "typing" && current?.typing) window.history.replaceState(entry, "", url);
  else if (sameQuery(query, fromUrl(location.search)) && current) {
    window.history.replaceState(entry, "", url);
  } else window.history.pushState(entry, "", url);
}

// ---------------------------------------------------------------------------------------------
// Searching

const grid = new ResultsGrid($("#grid"), client, {
  onOpen: (hit, opener) => viewer.open(hit, opener),
  onSimilar: (hit) => searchSimilar(hit),
});
const viewer = new Viewer($("#viewer"), client, { onSimilar: (hit) => searchSimilar(hit) });

// The summary of a finished search, as a function of the current language.
function describeSearch(query, count, body) {
  const ms = body?.took_ms?.total;
  const name = state.image?.file.name ?? "";
  return () => {
    const params = {
      results: t("status.results", { count }),
      took: Number.isFinite(ms) ? t("status.took", { ms: Math.round(ms) }) : "",
    };
    if (query.similar !== null) return t("status.similar", { ...params, id: query.similar });
    if (query.q) return t("status.text", { ...params, query: query.q });
    return t("status.image", { ...params, name });
  };
}

function noResultsText(query) {
  const filtered = apiFilters(query) !== null;
  return () => t(filtered ? "message.noResultsFiltered" : "message.noResults");
}

async function runQuery(query, { history = "push", focusResults = false } = {}) {
  state.search?.abort();
  state.query = query;
  const mode = query.similar !== null ? "similar" : query.q ? "text" : state.image ? "image" : "";
  document.body.dataset.mode = mode;
  ui.form.classList.toggle("similar-mode", mode === "similar");
  record(query, history);
  if (!mode) {
    grid.clear();
    setStatus(null);
    clearMessage("error");
    clearMessage("info");
    document.body.dataset.results = "none";
    return;
  }
  const controller = new AbortController();
  state.search = controller;
  ui.results.setAttribute("aria-busy", "true");
  document.body.dataset.results = "loading";
  setStatus(() => t("status.searching"));
  const filters = apiFilters(query);
  try {
    let body;
    if (mode === "text") body = await client.searchText(query.q, query.k, filters, controller.signal);
    else if (mode === "similar") body = await client.similar(query.similar, query.k, filters, controller.signal);
    else body = await client.searchImage(state.image.file, query.k, filters, controller.signal);
    if (controller.signal.aborted) return;
    clearMessage("error");
    clearMessage("info");
    grid.render(body.results);
    setStatus(describeSearch(query, body.results.length, body));
    if (body.results.length === 0) {
      if (indexIsEmpty() || body.generation === 0) showNoIndex();
      else showMessage("info", noResultsText(query), { code: "no_results" });
    }
    document.body.dataset.results = "shown";
    if (focusResults) grid.focusFirst();
  } catch (error) {
    if (error.name === "AbortError") return;
    grid.clear();
    setStatus(null);
    document.body.dataset.results = "failed";
    if (error instanceof ApiError && error.code === "no_catalog") showNoIndex();
    else showFailure(error, { upload: mode === "image" });
  } finally {
    if (state.search === controller) {
      state.search = null;
      ui.results.removeAttribute("aria-busy");
    }
  }
}

function searchFromForm(history) {
  clearTimeout(state.typingTimer);
  const query = readForm();
  if (query.q) {
    query.similar = null;
    if (state.image) setQueryImage(null);
  }
  runQuery(query, { history });
}

function searchSimilar(hit) {
  clearTimeout(state.typingTimer);
  setQueryImage(null);
  const query = { ...readForm(), q: "", similar: hit.id };
  ui.q.value = "";
  const name = fileName(hit.path);
  setStatus(() => t("status.lookingLike", { name }));
  runQuery(query, { focusResults: true });
}

function searchByImage(file) {
  if (!file) return;
  clearTimeout(state.typingTimer);
  setQueryImage(file);
  ui.q.value = "";
  const query = { ...readForm(), q: "", similar: null };
  runQuery(query);
}

function retry() {
  clearMessage();
  refreshIndexStatus().then((ok) => {
    if (ok) loadLabelOptions();
    if (ok && !indexIsEmpty()) runQuery(state.query, { history: "none" });
  });
}

// ---------------------------------------------------------------------------------------------
// Events

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  searchFromForm("push");
});

// An input method (pinyin, wubi, kana, ...) sends input events for every keystroke of a word
// still being composed ("hong" on the way to 红): those are not the user's query yet. The
// search starts once the composed text is committed.
ui.q.addEventListener("compositionstart", () => {
  state.composing = true;
  clearTimeout(state.typingTimer);
});
ui.q.addEventListener("compositionend", () => {
  state.composing = false;
  searchAfterTyping();
});
ui.q.addEventListener("input", (event) => {
  if (event.isComposing || state.composing) {
    clearTimeout(state.typingTimer);
    return;
  }
  searchAfterTyping();
});

function searchAfterTyping() {
  clearTimeout(state.typingTimer);
  state.typingTimer = setTimeout(() => {
    const query = readForm();
    // An emptied box ends the text search, unless an image or "more like this" is the query.
    if (!query.q && (state.image || state.query.similar !== null)) return;
    searchFromForm("typing");
  }, TYPING_PAUSE_MS);
}

const filterFields = [ui.label, ui.prefix, ui.from, ui.to, ui.takenFrom, ui.takenTo, ui.camera];
for (const field of [...filterFields, ui.k]) {
  field.addEventListener("change", () => {
    const query = readForm();
    if (query.q || state.image || query.similar !== null) runQuery(query);
    else record(query, "push");
  });
}

ui.file.addEventListener("change", () => searchByImage(ui.file.files?.[0]));
// A file the browser cannot show (often one the server rejects too): no broken-image icon.
ui.queryImagePreview.addEventListener("error", () => ui.queryImagePreview.classList.add("broken"));
ui.queryImageClear.addEventListener("click", () => {
  setQueryImage(null);
  runQuery({ ...readForm(), q: "", similar: null });
  ui.q.focus();
});

for (const type of ["dragenter", "dragover"]) {
  ui.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    ui.dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  ui.dropZone.addEventListener(type, () => ui.dropZone.classList.remove("dragging"));
}
ui.dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  searchByImage(event.dataTransfer?.files?.[0]);
});
// A file dropped anywhere else must not replace the page with the image.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  keys.set(ui.keyInput.value.trim());
  ui.keyPanel.open = false;
  retry();
});
// A switch of language renders every text the page shows again; the query, the results and
// any open viewer stay as they are.
ui.language.addEventListener("change", () => {
  setLanguage(ui.language.value, { remember: true });
  renderLanguage();
});

function renderLanguage() {
  ui.language.value = language();
  translatePage();
  if (state.indexStatusText) setIndexStatus(state.indexStatusText);
  if (state.statusText) setStatus(state.statusText);
  renderMessage();
  if (state.image) ui.queryImagePreview.alt = t("image.alt", { name: state.image.file.name });
  grid.translate();
  viewer.translate();
}

ui.keyForget.addEventListener("click", () => {
  keys.set("");
  ui.keyInput.value = "";
  retry();
});

document.addEventListener("keydown", (event) => {
  if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return;
  if (viewer.isOpen) return;
  const target = event.target;
  if (target.closest?.("input, textarea, select, [contenteditable]")) return;
  event.preventDefault();
  ui.q.focus();
  ui.q.select();
});

window.addEventListener("popstate", () => {
  viewer.close();
  clearTimeout(state.typingTimer);
  const query = fromUrl(location.search);
  fillForm(query);
  // Back to an image search: it can be run again while this page still holds the image.
  if (!window.history.state?.image || query.q || query.similar !== null) setQueryImage(null);
  runQuery(query, { history: "none" });
});

// ---------------------------------------------------------------------------------------------
// Start

async function start() {
  setLanguage(pickLanguage(storedLanguage(), navigator.languages));
  renderLanguage();
  setIndexStatus(() => t("index.connecting"));
  ui.keyInput.value = keys.get();
  const query = fromUrl(location.search);
  state.query = query;
  fillForm(query);
  window.history.replaceState({ typing: false, image: false }, "", location.href);
  const ok = await refreshIndexStatus();
  if (ok) {
    await loadLabelOptions();
    fillForm(query);
    if (!indexIsEmpty()) runQuery(query, { history: "none" });
  }
  document.body.dataset.ready = "true";
  setInterval(() => {
    if (document.visibilityState === "visible") refreshIndexStatus({ report: false });
  }, STATUS_POLL_MS);
}

start();
