// A search as plain data, and its two spellings: the page URL (shareable, back button) and
// the API's filter object. An uploaded image cannot travel in a URL; only its filters do.

export const K_CHOICES = [12, 24, 48, 96];
export const DEFAULT_K = 24;
const MAX_K = 1000; // the API's default CLIPSEARCH_MAX_K; the server has the last word

export function emptyQuery() {
  return {
    q: "",
    similar: null,
    k: DEFAULT_K,
    label: "",
    set: "",
    prefix: "",
    from: "",
    to: "",
    takenFrom: "",
    takenTo: "",
    camera: "",
  };
}

function validDate(value) {
  return /^\d{4}-\d{2}-\d{2}$/.test(value ?? "") ? value : "";
}

export function fromUrl(search) {
  const params = new URLSearchParams(search);
  const query = emptyQuery();
  query.q = (params.get("q") ?? "").trim();
  const similar = Number.parseInt(params.get("similar") ?? "", 10);
  query.similar = Number.isSafeInteger(similar) && similar >= 0 ? similar : null;
  const k = Number.parseInt(params.get("k") ?? "", 10);
  query.k = Number.isSafeInteger(k) && k >= 1 && k <= MAX_K ? k : DEFAULT_K;
  query.label = params.get("label") ?? "";
  query.set = query.label ? params.get("set") ?? "" : "";
  query.prefix = params.get("prefix") ?? "";
  query.from = validDate(params.get("from"));
  query.to = validDate(params.get("to"));
  query.takenFrom = validDate(params.get("taken_from"));
  query.takenTo = validDate(params.get("taken_to"));
  query.camera = (params.get("camera") ?? "").trim();
  return query;
}

export function toUrl(query) {
  const params = new URLSearchParams();
  if (query.similar !== null) params.set("similar", String(query.similar));
  else if (query.q) params.set("q", query.q);
  if (query.k !== DEFAULT_K) params.set("k", String(query.k));
  if (query.label) {
    params.set("label", query.label);
    if (query.set) params.set("set", query.set);
  }
  if (query.prefix) params.set("prefix", query.prefix);
  if (query.from) params.set("from", query.from);
  if (query.to) params.set("to", query.to);
  if (query.takenFrom) params.set("taken_from", query.takenFrom);
  if (query.takenTo) params.set("taken_to", query.takenTo);
  if (query.camera) params.set("camera", query.camera);
  const text = params.toString();
  return text ? `?${text}` : location.pathname;
}

export function sameQuery(a, b) {
  return toUrl(a) === toUrl(b);
}

function localMidnight(isoDate, addDays = 0) {
  const [year, month, day] = isoDate.split("-").map(Number);
  return new Date(year, month - 1, day + addDays).toISOString();
}

// The API's `filters` object, or null when nothing restricts the search. Label fields are only
// sent when a label is chosen, so servers without labels never see them.
export function apiFilters(query) {
  const filters = {};
  if (query.prefix) filters.path_prefix = query.prefix;
  if (query.from) filters.indexed_after = localMidnight(query.from);
  // "until" includes the whole day; the API's indexed_before is exclusive.
  if (query.to) filters.indexed_before = localMidnight(query.to, 1);
  // A capture date: EXIF DateTimeOriginal, else the file's modification time.
  if (query.takenFrom) filters.taken_after = localMidnight(query.takenFrom);
  if (query.takenTo) filters.taken_before = localMidnight(query.takenTo, 1);
  if (query.camera) filters.camera = query.camera;
  if (query.label) {
    filters.labels = [query.label];
    if (query.set) filters.label_set = query.set;
  }
  return Object.keys(filters).length ? filters : null;
}

export function hasFilters(query) {
  return apiFilters(query) !== null;
}
