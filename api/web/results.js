// The results grid: one card per hit, thumbnails fetched (with the key) only as they scroll
// near the viewport, and arrow-key movement between cards.

import { t } from "./i18n.js";

const CHIPS_ON_CARD = 3;
// A label set may store labels the model hardly believes (threshold 0); a card shows the best
// label and the others above this probability. The viewer shows them all.
const CARD_CHIP_MIN_SCORE = 0.1;
const PRELOAD_MARGIN = "300px";

export function fileName(path) {
  const parts = String(path).split(/[\\/]/).filter(Boolean);
  return parts.slice(-2).join("/") || String(path);
}

// The end of a file name that a card always shows: at most the last 8 characters of its stem,
// from a word's edge where there is one, and its extension. Cut at the end, names with a long
// common start (IMG_20240801_…) all looked alike.
const NAME_TAIL_STEM_CHARS = 8;
const NAME_TAIL_MIN_STEM_CHARS = 4;
const NAME_TAIL_MAX_EXTENSION = 6;

// [head, tail] of a card's name: the head gives way (an ellipsis) when the card is narrow, the
// tail stays whole, so the ellipsis falls in the middle: "2024-summ…_0017.jpg".
export function nameParts(path) {
  const name = fileName(path);
  const base = name.slice(name.lastIndexOf("/") + 1);
  const dot = base.lastIndexOf(".");
  const extension = dot > 0 && base.length - dot <= NAME_TAIL_MAX_EXTENSION ? base.slice(dot) : "";
  const stem = base.slice(0, base.length - extension.length);
  let stemKept = Math.min(stem.length, NAME_TAIL_STEM_CHARS);
  const edge = stem.slice(stem.length - stemKept).search(/[\s_.-]/);
  if (stem.length > stemKept && edge > 0 && stemKept - edge >= NAME_TAIL_MIN_STEM_CHARS) {
    stemKept -= edge;
  }
  const keep = stemKept + extension.length;
  return [name.slice(0, name.length - keep), name.slice(name.length - keep)];
}

// The labels worth a chip on a card: best first, as the API sends them.
export function cardLabels(hit) {
  if (!Array.isArray(hit.labels)) return [];
  return hit.labels
    .filter((label, index) => index === 0 || Number(label.score) >= CARD_CHIP_MIN_SCORE)
    .slice(0, CHIPS_ON_CARD);
}

// Alt text says what the labels say the picture shows, then which file it is.
export function altText(hit) {
  const labels = cardLabels(hit).map((l) => l.label);
  const name = fileName(hit.path);
  return labels.length ? `${labels.join(", ")} (${name})` : name;
}

export function percent(score) {
  return `${Math.round(Number(score) * 100)}%`;
}

export function labelChip(label) {
  const chip = document.createElement("li");
  chip.className = "chip";
  chip.title = `${label.set}: ${label.label} (${Number(label.score).toFixed(3)})`;
  chip.append(label.label + " ");
  const score = document.createElement("span");
  score.className = "chip-score";
  score.textContent = percent(label.score);
  chip.append(score);
  return chip;
}

export class ResultsGrid {
  #list;
  #client;
  #onOpen;
  #onSimilar;
  #observer = null;
  #urls = [];
  #loads = null;
  #hits = [];

  constructor(list, client, { onOpen, onSimilar }) {
    this.#list = list;
    this.#client = client;
    this.#onOpen = onOpen;
    this.#onSimilar = onSimilar;
    list.addEventListener("keydown", (event) => this.#arrowKeys(event));
  }

  clear() {
    this.#observer?.disconnect();
    this.#loads?.abort();
    for (const url of this.#urls) URL.revokeObjectURL(url);
    this.#urls = [];
    this.#hits = [];
    this.#list.replaceChildren();
  }

  render(hits) {
    this.clear();
    this.#loads = new AbortController();
    const loads = this.#loads;
    this.#observer = new IntersectionObserver(
      (entries, observer) => {
        for (const entry of entries) {
          if (!entry.isIntersecting) continue;
          observer.unobserve(entry.target);
          this.#loadThumbnail(entry.target, loads.signal);
        }
      },
      { rootMargin: PRELOAD_MARGIN },
    );
    this.#hits = hits;
    this.#list.replaceChildren(...hits.map((hit, index) => this.#card(hit, index)));
    for (const img of this.#list.querySelectorAll("img[data-src]")) this.#observer.observe(img);
  }

  // The cards' words in the current language; thumbnails and focus stay as they are.
  translate() {
    const cards = [...this.#list.children];
    cards.forEach((item, index) => this.#cardText(item, this.#hits[index], index));
  }

  focusFirst() {
    this.#list.querySelector(".thumb")?.focus();
  }

  #card(hit, index) {
    const item = document.createElement("li");
    item.className = "card";
    item.dataset.id = String(hit.id);
    item.dataset.path = hit.path;

    const open = document.createElement("button");
    open.type = "button";
    open.className = "thumb";
    const verb = document.createElement("span");
    verb.className = "visually-hidden";
    const img = document.createElement("img");
    img.alt = altText(hit);
    img.dataset.src = hit.thumbnail_url;
    img.width = 256;
    img.height = 256;
    img.decoding = "async";
    open.append(verb, img);
    open.addEventListener("click", () => this.#onOpen(hit, open));

    const info = document.createElement("div");
    info.className = "card-info";
    const score = document.createElement("span");
    score.className = "score";
    const name = document.createElement("span");
    name.className = "name";
    name.title = hit.path; // the whole path, on hover
    const [head, tail] = nameParts(hit.path);
    for (const [part, text] of [["name-head", head], ["name-tail", tail]]) {
      const span = document.createElement("span");
      span.className = part;
      span.textContent = text;
      name.append(span);
    }
    info.append(score, name);

    const labels = cardLabels(hit);
    if (labels.length) {
      const chips = document.createElement("ul");
      chips.className = "chips";
      chips.append(...labels.map(labelChip));
      info.append(chips);
    }

    const similar = document.createElement("button");
    similar.type = "button";
    similar.className = "similar secondary";
    similar.addEventListener("click", () => this.#onSimilar(hit));
    info.append(similar);

    item.append(open, info);
    this.#cardText(item, hit, index);
    return item;
  }

  #cardText(item, hit, index) {
    item.querySelector(".thumb .visually-hidden").textContent = t("card.open", { n: index + 1 });
    const score = item.querySelector(".score");
    score.title = t("card.scoreTitle");
    score.textContent = t("card.score", { score: Number(hit.score).toFixed(3) });
    item.querySelector(".chips")?.setAttribute("aria-label", t("card.labels"));
    const similar = item.querySelector(".similar");
    similar.textContent = t("card.similar");
    similar.setAttribute("aria-label", t("card.similarFor", { name: fileName(hit.path) }));
    const img = item.querySelector(".thumb img");
    if (img.dataset.error !== undefined) {
      img.title = t("card.thumbnailFailed", { message: img.dataset.error });
    }
  }

  async #loadThumbnail(img, signal) {
    const card = img.closest(".card");
    try {
      const blob = await this.#client.blob(img.dataset.src, { signal });
      if (signal.aborted) return;
      const url = URL.createObjectURL(blob);
      this.#urls.push(url);
      img.addEventListener("load", () => (card.dataset.thumb = "loaded"), { once: true });
      img.src = url;
    } catch (error) {
      if (error.name === "AbortError") return;
      card.dataset.thumb = "failed";
      card.querySelector(".thumb").classList.add("broken");
      img.dataset.error = error.message;
      img.title = t("card.thumbnailFailed", { message: error.message });
    }
  }

  #columns() {
    const cards = [...this.#list.children];
    if (cards.length === 0) return 1;
    const top = cards[0].offsetTop;
    const sameRow = cards.findIndex((card) => card.offsetTop !== top);
    return sameRow === -1 ? cards.length : sameRow;
  }

  #arrowKeys(event) {
    const thumb = event.target.closest?.(".thumb");
    if (!thumb || event.altKey || event.ctrlKey || event.metaKey) return;
    const thumbs = [...this.#list.querySelectorAll(".thumb")];
    const at = thumbs.indexOf(thumb);
    const step = {
      ArrowRight: 1,
      ArrowLeft: -1,
      ArrowDown: this.#columns(),
      ArrowUp: -this.#columns(),
      Home: -at,
      End: thumbs.length - 1 - at,
    }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const next = thumbs[Math.min(thumbs.length - 1, Math.max(0, at + step))];
    next.focus();
    next.scrollIntoView({ block: "nearest" });
  }
}
