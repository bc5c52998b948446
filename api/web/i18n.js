// The page's own words, in each language it speaks. Everything the page writes goes through
// t(); the API's error messages do not (they are shown as the server sends them, in English).
// Static text in index.html names its message with data-i18n (text), data-i18n-placeholder,
// data-i18n-aria-label or data-i18n-title; translatePage() fills them in.

export const LANGUAGES = { en: "English", "zh-CN": "中文" };
export const DEFAULT_LANGUAGE = "en";
const LANGUAGE_STORAGE = "clipsearch.language";

// "{name}" is a parameter. A key with a ".one" variant is used when params.count is 1 (English
// plurals); Chinese needs none. A message missing in one language falls back to English.
const MESSAGES = {
  en: {
    "page.skip": "Skip to results",
    "language.label": "Language",
    "key.summary": "API key",
    "key.label": "Key sent as {header}, kept in this browser",
    "key.placeholder": "paste your key",
    "key.save": "Save",
    "key.forget": "Forget",
    "search.label": "Search by text",
    "search.placeholder": "Describe a picture, e.g. a red circle",
    "search.submit": "Search",
    "search.hint": "Results appear as you type (press {key} to get here). Or search by example:",
    "drop.title": "Drop an image here, or {choose}",
    "drop.choose": "choose a file",
    "drop.formats": "JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF",
    "image.clear": "Clear image",
    "image.alt": "Query image {name}",
    "filters.legend": "Filters",
    "filters.label": "Label",
    "filters.anyLabel": "Any label",
    "filters.prefix": "Folder starts with",
    "filters.from": "Indexed from",
    "filters.to": "Indexed until",
    "filters.takenFrom": "Taken from",
    "filters.takenTo": "Taken until",
    "filters.camera": "Camera",
    "filters.k": "Results",
    "results.region": "Results",
    "results.list": "Search results",
    "index.connecting": "Connecting…",
    "index.status": "Generation {generation} · {images} · {model}",
    "index.images": "{count} images",
    "index.images.one": "{count} image",
    "index.degraded":
      " · degraded: {count} corrupt shards not served ({missing}); run “clipsearch repair”",
    "index.degraded.one":
      " · degraded: {count} corrupt shard not served ({missing}); run “clipsearch repair”",
    "index.noModel": "no model yet",
    "index.randomWeights":
      "Random weights (pretrained=none): results are meaningless. " +
      "Get real weights with “clipsearch models” and index again.",
    "index.none": "No index yet",
    "index.unreachable": "Server unreachable",
    "index.keyNeeded": "API key needed",
    "index.unavailable": "Index status unavailable: {message}",
    "message.noIndex":
      "No index yet. Index a folder with “clipsearch index /path/to/pictures”; " +
      "this page notices the new index by itself within a few seconds.",
    "message.keyRefused":
      "The server refused the API key: {message} Enter a valid key under “API key”.",
    "message.keyNeeded":
      "This server needs an API key. Enter it under “API key” at the top of the page.",
    "message.unreachable":
      "The server is unreachable ({origin}). " +
      "Check that “clipsearch serve” is running and the network is up, then retry.",
    "message.retry": "Retry",
    "message.uploadRejected": "The server rejected the image: {message}",
    "message.searchFailed": "The search failed: {message}",
    "message.pageError": "Something went wrong in this page: {message}",
    "message.noResultsFiltered":
      "No images match this search and its filters. Remove a filter, or try other words.",
    "message.noResults": "No images match this search. Try other words or another picture.",
    "status.searching": "Searching…",
    "status.lookingLike": "Looking for images like {name}…",
    "status.results": "{count} results",
    "status.results.one": "{count} result",
    "status.took": " in {ms} ms",
    "status.text": "{results} for “{query}”{took}",
    "status.similar": "{results} like image {id}{took}",
    "status.image": "{results} for the image {name}{took}",
    "card.open": "Open result {n}: ",
    "card.scoreTitle": "Similarity to the query (cosine)",
    "card.score": "score {score}",
    "card.labels": "Labels",
    "card.similar": "More like this",
    "card.similarFor": "More like this: {name}",
    "card.thumbnailFailed": "Thumbnail unavailable: {message}",
    "viewer.labels": "Labels",
    "viewer.similar": "More like this",
    "viewer.download": "Download",
    "viewer.close": "Close",
    "viewer.noLabels": "No labels for this image.",
    "viewer.loadFailed": "The image could not be loaded: {message}",
    "meta.path": "Path",
    "meta.score": "Score",
    "meta.size": "Size",
    "meta.pixels": "{width} × {height} px",
    "meta.format": "Format",
    "meta.taken": "Taken",
    "meta.takenFromFile": "{date} (file date: no capture date in the photo)",
    "meta.camera": "Camera",
    "meta.location": "Location",
    "meta.map": "Show on OpenStreetMap",
    "meta.fileSize": "File size",
    "meta.bytes": "{count} bytes",
    "meta.indexed": "Indexed",
    "meta.id": "Image id",
    "meta.sha256": "SHA-256",
    "meta.problem": "Problem",
  },
  "zh-CN": {
    "page.skip": "跳到搜索结果",
    "language.label": "语言",
    "key.summary": "API 密钥",
    "key.label": "以 {header} 请求头发送，保存在此浏览器中",
    "key.placeholder": "粘贴你的密钥",
    "key.save": "保存",
    "key.forget": "清除",
    "search.label": "按文字搜索",
    "search.placeholder": "描述一张图片，例如：红色的圆形",
    "search.submit": "搜索",
    "search.hint": "边输入边出结果（按 {key} 键回到这里）。也可以以图搜图：",
    "drop.title": "把图片拖到这里，或{choose}",
    "drop.choose": "选择文件",
    "drop.formats": "支持 JPEG、PNG、WebP、GIF、BMP、TIFF、HEIC 和 AVIF",
    "image.clear": "清除图片",
    "image.alt": "查询图片 {name}",
    "filters.legend": "筛选",
    "filters.label": "标签",
    "filters.anyLabel": "任意标签",
    "filters.prefix": "文件夹路径开头",
    "filters.from": "索引日期起",
    "filters.to": "索引日期止",
    "filters.takenFrom": "拍摄日期起",
    "filters.takenTo": "拍摄日期止",
    "filters.camera": "相机",
    "filters.k": "结果数",
    "results.region": "结果",
    "results.list": "搜索结果",
    "index.connecting": "正在连接…",
    "index.status": "第 {generation} 代 · {images} · {model}",
    "index.images": "{count} 张图片",
    "index.degraded": " · 降级：{count} 个损坏的分片未提供服务（{missing}）；请运行“clipsearch repair”",
    "index.noModel": "尚无模型",
    "index.randomWeights":
      "随机权重（pretrained=none）：搜索结果没有意义。请用“clipsearch models”获取真实权重后重新索引。",
    "index.none": "尚无索引",
    "index.unreachable": "无法连接服务器",
    "index.keyNeeded": "需要 API 密钥",
    "index.unavailable": "无法获取索引状态：{message}",
    "message.noIndex":
      "还没有索引。请用“clipsearch index /path/to/pictures”为文件夹建立索引；" +
      "几秒钟内本页会自动发现新索引。",
    "message.keyRefused": "服务器拒绝了该 API 密钥：{message} 请在“API 密钥”中输入有效的密钥。",
    "message.keyNeeded": "此服务器需要 API 密钥。请在页面顶部的“API 密钥”中输入。",
    "message.unreachable":
      "无法连接服务器（{origin}）。请确认“clipsearch serve”正在运行、网络正常，然后重试。",
    "message.retry": "重试",
    "message.uploadRejected": "服务器拒绝了这张图片：{message}",
    "message.searchFailed": "搜索失败：{message}",
    "message.pageError": "页面出错：{message}",
    "message.noResultsFiltered": "没有符合此搜索和筛选条件的图片。请去掉一个筛选条件，或换个说法。",
    "message.noResults": "没有符合此搜索的图片。请换个说法，或换一张图片。",
    "status.searching": "正在搜索…",
    "status.lookingLike": "正在查找与 {name} 相似的图片…",
    "status.results": "{count} 个结果",
    "status.took": "，用时 {ms} 毫秒",
    "status.text": "“{query}”：{results}{took}",
    "status.similar": "与图片 {id} 相似：{results}{took}",
    "status.image": "以图片 {name} 搜索：{results}{took}",
    "card.open": "打开第 {n} 个结果：",
    "card.scoreTitle": "与查询的相似度（余弦）",
    "card.score": "得分 {score}",
    "card.labels": "标签",
    "card.similar": "查找相似图片",
    "card.similarFor": "查找相似图片：{name}",
    "card.thumbnailFailed": "缩略图不可用：{message}",
    "viewer.labels": "标签",
    "viewer.similar": "查找相似图片",
    "viewer.download": "下载",
    "viewer.close": "关闭",
    "viewer.noLabels": "这张图片没有标签。",
    "viewer.loadFailed": "无法加载图片：{message}",
    "meta.path": "路径",
    "meta.score": "得分",
    "meta.size": "尺寸",
    "meta.pixels": "{width} × {height} 像素",
    "meta.format": "格式",
    "meta.taken": "拍摄时间",
    "meta.takenFromFile": "{date}（文件日期：照片中没有拍摄时间）",
    "meta.camera": "相机",
    "meta.location": "位置",
    "meta.map": "在 OpenStreetMap 上查看",
    "meta.fileSize": "文件大小",
    "meta.bytes": "{count} 字节",
    "meta.indexed": "索引时间",
    "meta.id": "图片 ID",
    "meta.sha256": "SHA-256",
    "meta.problem": "问题",
  },
};

let current = DEFAULT_LANGUAGE;

const speaks = (lang) => Object.prototype.hasOwnProperty.call(LANGUAGES, lang ?? "");

export function language() {
  return current;
}

// The user's earlier choice, else the browser's first language the page speaks: any zh* tag
// (zh, zh-CN, zh-TW, zh-Hans-HK, ...) is Chinese, en* is English; anything else, English.
export function pickLanguage(stored, preferred) {
  if (speaks(stored)) return stored;
  for (const tag of preferred ?? []) {
    const lower = String(tag).toLowerCase();
    if (lower === "zh" || lower.startsWith("zh-")) return "zh-CN";
    if (lower === "en" || lower.startsWith("en-")) return "en";
  }
  return DEFAULT_LANGUAGE;
}

function storage() {
  try {
    return window.localStorage;
  } catch {
    return null; // storage disabled: the choice lasts as long as the page
  }
}

export function storedLanguage() {
  return storage()?.getItem(LANGUAGE_STORAGE) ?? null;
}

// Use `lang` from now on (and `remember` it for the next visit); <html lang> follows, so
// screen readers pick the right voice and browsers the right CJK glyphs.
export function setLanguage(lang, { remember = false } = {}) {
  current = speaks(lang) ? lang : DEFAULT_LANGUAGE;
  document.documentElement.lang = current;
  if (remember) storage()?.setItem(LANGUAGE_STORAGE, current);
}

export function t(key, params = {}) {
  const messages = MESSAGES[current];
  const singular = params.count === 1 ? messages[`${key}.one`] : undefined;
  const text = singular ?? messages[key] ?? MESSAGES.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (slot, name) =>
    params[name] === undefined ? slot : String(params[name]),
  );
}

// Fill an element with a message whose {slots} are child elements marked data-slot="name"
// (a <kbd>, a <code>, a link-like span): the elements are kept and moved into place.
function fillWithSlots(element, text) {
  const slots = new Map(
    [...element.querySelectorAll(":scope > [data-slot]")].map((el) => [el.dataset.slot, el]),
  );
  const parts = text.split(/\{(\w+)\}/);
  const nodes = parts.map((part, i) =>
    i % 2 === 1 && slots.has(part) ? slots.get(part) : document.createTextNode(part),
  );
  element.replaceChildren(...nodes.filter((node) => node.nodeType !== 3 || node.data));
}

// data-i18n-X="key" translates the attribute X.
const ATTRIBUTES = ["placeholder", "aria-label", "title"];

export function translatePage(root = document) {
  for (const element of root.querySelectorAll("[data-i18n]")) {
    const text = t(element.dataset.i18n);
    if (element.querySelector(":scope > [data-slot]")) fillWithSlots(element, text);
    else element.textContent = text;
  }
  for (const attribute of ATTRIBUTES) {
    for (const element of root.querySelectorAll(`[data-i18n-${attribute}]`)) {
      element.setAttribute(attribute, t(element.getAttribute(`data-i18n-${attribute}`)));
    }
  }
}
