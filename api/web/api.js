// The page's HTTP client. Every call carries the key from the key field (X-API-Key), and
// every failure becomes an ApiError with the server's {code, message}, or Unreachable when
// no answer came back at all. Images are fetched the same way and shown from blob: URLs,
// because an <img src> cannot send a header and a key in a URL would end up in logs.

const KEY_STORAGE = "clipsearch.apiKey";

// This file is served at <root>/web/api.js, so the API root is one level up; the page keeps
// working behind a reverse proxy that adds a path prefix.
export const API_ROOT = new URL("../", import.meta.url);

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export class Unreachable extends Error {
  constructor(cause) {
    super(`No answer from ${API_ROOT.origin}`);
    this.name = "Unreachable";
    this.cause = cause;
  }
}

function storage() {
  try {
    return window.localStorage;
  } catch {
    return null; // storage disabled: the key lives only as long as the page
  }
}

export class KeyStore {
  #memory = "";

  get() {
    return storage()?.getItem(KEY_STORAGE) ?? this.#memory;
  }

  set(key) {
    this.#memory = key;
    const store = storage();
    if (!store) return;
    if (key) store.setItem(KEY_STORAGE, key);
    else store.removeItem(KEY_STORAGE);
  }
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.code === "string") code = body.code;
    if (body && typeof body.message === "string") message = body.message;
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  return new ApiError(response.status, code, message);
}

export class Client {
  constructor(keys) {
    this.keys = keys;
  }

  url(path) {
    // Paths from the API ("/images/7/thumbnail") are absolute; ours are relative to the root.
    return new URL(path.startsWith("/") ? path.slice(1) : path, API_ROOT);
  }

  async #send(path, { method = "GET", json, form, signal } = {}) {
    const headers = { Accept: "application/json" };
    const key = this.keys.get();
    if (key) headers["X-API-Key"] = key;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser sets the multipart boundary
    }
    let response;
    try {
      response = await fetch(this.url(path), { method, headers, body, signal });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Unreachable(error);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async json(path, options) {
    return (await this.#send(path, options)).json();
  }

  async blob(path, options) {
    return (await this.#send(path, options)).blob();
  }

  index(signal) {
    return this.json("index", { signal });
  }

  searchText(query, k, filters, signal) {
    const json = { query, k };
    if (filters) json.filters = filters;
    return this.json("search/text", { method: "POST", json, signal });
  }

  searchImage(file, k, filters, signal) {
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    form.append("k", String(k));
    if (filters) form.append("filters", JSON.stringify(filters));
    return this.json("search/image", { method: "POST", form, signal });
  }

  similar(imageId, k, filters, signal) {
    const params = new URLSearchParams({ k: String(k) });
    if (filters) params.set("filters", JSON.stringify(filters));
    return this.json(`images/${encodeURIComponent(imageId)}/similar?${params}`, { signal });
  }

  image(imageId, signal) {
    return this.json(`images/${encodeURIComponent(imageId)}`, { signal });
  }

  // Labels (issue 5) may not exist on this server: null means "no labels here".
  async labelSets(signal) {
    try {
      const body = await this.json("label-sets", { signal });
      return Array.isArray(body.label_sets) ? body.label_sets : null;
    } catch (error) {
      if (error instanceof ApiError && (error.status === 404 || error.status === 405)) return null;
      throw error;
    }
  }

  async labelCounts(setName, signal) {
    try {
      return await this.json(`labels/${encodeURIComponent(setName)}/counts`, { signal });
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return null;
      throw error;
    }
  }
}
