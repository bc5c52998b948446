// The image viewer: a modal <dialog> with the full image, its metadata and all its labels.
// The dialog traps focus and closes on Escape by itself; focus returns to the opening card.

import { language, t } from "./i18n.js";
import { altText, fileName, labelChip } from "./results.js";

function formatBytes(size) {
  if (!Number.isFinite(size)) return "";
  const units = ["bytes", "KiB", "MiB", "GiB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? t("meta.bytes", { count: value }) : `${value.toFixed(1)} ${units[unit]}`;
}

function formatDate(value) {
  if (!value) return "";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString(language());
}

// When the photo was taken; a date that only the file's modification time gave says so.
function formatTaken(info) {
  const date = formatDate(info.taken_at);
  if (!date) return "";
  return info.taken_at_source === "file" ? t("meta.takenFromFile", { date }) : date;
}

// "Apple iPhone 15 Pro", but "Canon EOS 5D" rather than "Canon Canon EOS 5D".
export function cameraName(info) {
  const make = (info.camera_make || "").trim();
  const model = (info.camera_model || "").trim();
  if (!make || model.toLowerCase().startsWith(make.toLowerCase())) return model;
  return model ? `${make} ${model}` : make;
}

function hasPosition(info) {
  return Number.isFinite(info.latitude) && Number.isFinite(info.longitude);
}

// The GPS position as text and a link to the place on OpenStreetMap (opened only on a click).
function positionLink(info) {
  const link = document.createElement("a");
  const lat = Number(info.latitude);
  const lon = Number(info.longitude);
  link.textContent = `${lat.toFixed(5)}, ${lon.toFixed(5)}`;
  link.href = `https://www.openstreetmap.org/?mlat=${lat}&mlon=${lon}#map=16/${lat}/${lon}`;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.title = t("meta.map");
  return link;
}

// Browsers other than Safari cannot show a HEIC (nor most TIFFs): the viewer then shows the
// server's JPEG rendering, as large as it makes them. The download stays the original file.
const PREVIEW_SIDE = 2048;

export class Viewer {
  #dialog;
  #client;
  #onSimilar;
  #hit = null;
  #opener = null;
  #url = null;
  #preview = null;
  #loads = null;
  #info = null; // what #showMeta and #showLabels last showed, to show again in another language
  #labels = null;

  constructor(dialog, client, { onSimilar }) {
    this.#dialog = dialog;
    this.#client = client;
    this.#onSimilar = onSimilar;
    dialog.querySelector("#viewer-close").addEventListener("click", () => this.close());
    dialog.querySelector("#viewer-similar").addEventListener("click", () => {
      const hit = this.#hit;
      this.close();
      if (hit) this.#onSimilar(hit);
    });
    // A click on the backdrop lands on the dialog element itself.
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) this.close();
    });
    dialog.addEventListener("close", () => this.#cleanUp());
  }

  get isOpen() {
    return this.#dialog.open;
  }

  open(hit, opener) {
    this.#cleanUp();
    this.#hit = hit;
    this.#opener = opener ?? null;
    this.#loads = new AbortController();
    const dialog = this.#dialog;
    dialog.dataset.id = String(hit.id);
    dialog.querySelector("#viewer-title").textContent = fileName(hit.path);
    const img = dialog.querySelector("#viewer-img");
    img.removeAttribute("src");
    img.alt = altText(hit);
    dialog.dataset.image = "loading";
    this.#showMeta(hit);
    this.#showLabels(hit.labels);
    const download = dialog.querySelector("#viewer-download");
    download.removeAttribute("href");
    download.setAttribute("aria-disabled", "true");
    download.download = String(hit.path).split(/[\\/]/).pop() || "image";
    dialog.showModal();
    // The title first: a screen reader announces which image opened, and a phone shows the top.
    dialog.querySelector("#viewer-title").focus();
    this.#loadDetails(hit, this.#loads.signal);
  }

  close() {
    if (this.#dialog.open) this.#dialog.close();
  }

  translate() {
    if (!this.#dialog.open) return;
    this.#showMeta(this.#info);
    this.#showLabels(this.#labels);
  }

  #cleanUp() {
    this.#loads?.abort();
    this.#loads = null;
    if (this.#url) URL.revokeObjectURL(this.#url);
    this.#url = null;
    if (this.#preview) URL.revokeObjectURL(this.#preview);
    this.#preview = null;
    const opener = this.#opener;
    this.#opener = null;
    if (opener?.isConnected) opener.focus();
  }

  async #loadDetails(hit, signal) {
    const dialog = this.#dialog;
    const metadata = this.#client.image(hit.id, signal).then(
      (meta) => {
        this.#showMeta({ ...hit, ...meta });
        if (Array.isArray(meta.labels)) this.#showLabels(meta.labels);
      },
      () => {}, // the search hit's own fields are already shown
    );
    try {
      const blob = await this.#client.blob(hit.file_url, { signal });
      this.#url = URL.createObjectURL(blob);
      const img = dialog.querySelector("#viewer-img");
      img.addEventListener("load", () => (dialog.dataset.image = "loaded"), { once: true });
      img.addEventListener("error", () => this.#showPreview(hit, signal), { once: true });
      img.src = this.#url;
      const download = dialog.querySelector("#viewer-download");
      download.href = this.#url;
      download.removeAttribute("aria-disabled");
    } catch (error) {
      if (error.name === "AbortError") return;
      dialog.dataset.image = "failed";
      this.#showMeta({ ...this.#info, error: error.message });
    }
    await metadata;
  }

  async #showPreview(hit, signal) {
    const dialog = this.#dialog;
    try {
      const blob = await this.#client.blob(`${hit.thumbnail_url}?size=${PREVIEW_SIDE}`, {
        signal,
      });
      this.#preview = URL.createObjectURL(blob);
      const img = dialog.querySelector("#viewer-img");
      img.addEventListener("load", () => (dialog.dataset.image = "loaded"), { once: true });
      img.addEventListener("error", () => (dialog.dataset.image = "failed"), { once: true });
      img.src = this.#preview;
    } catch (error) {
      if (error.name === "AbortError") return;
      dialog.dataset.image = "failed";
      this.#showMeta({ ...this.#info, error: error.message });
    }
  }

  #showMeta(info) {
    this.#info = info;
    const { width, height } = info;
    const rows = [
      [t("meta.path"), info.path],
      [t("meta.score"), info.score === undefined ? "" : Number(info.score).toFixed(4)],
      [t("meta.size"), width && height ? t("meta.pixels", { width, height }) : ""],
      [t("meta.format"), info.format],
      [t("meta.taken"), formatTaken(info)],
      [t("meta.camera"), cameraName(info)],
      [t("meta.location"), hasPosition(info) ? positionLink(info) : ""],
      [t("meta.fileSize"), formatBytes(info.size)],
      [t("meta.indexed"), formatDate(info.indexed_at)],
      [t("meta.id"), String(info.id)],
      [t("meta.sha256"), info.sha256],
      [t("meta.problem"), info.error && t("viewer.loadFailed", { message: info.error })],
    ];
    const list = this.#dialog.querySelector("#viewer-meta");
    list.replaceChildren();
    for (const [name, value] of rows) {
      if (!value) continue;
      const term = document.createElement("dt");
      term.textContent = name;
      const detail = document.createElement("dd");
      if (value instanceof Node) detail.append(value);
      else detail.textContent = value;
      list.append(term, detail);
    }
  }

  #showLabels(labels) {
    this.#labels = labels;
    const list = this.#dialog.querySelector("#viewer-labels");
    if (Array.isArray(labels) && labels.length) {
      list.replaceChildren(...labels.map(labelChip));
    } else {
      const none = document.createElement("li");
      none.className = "none";
      none.textContent = t("viewer.noLabels");
      list.replaceChildren(none);
    }
  }
}
