// cvserve's web page: upload an image or a video, send it to one of the task endpoints and
// draw the JSON answer over it. Plain browser JavaScript, no build step, nothing external.
"use strict";

// Which model tasks each page task can send to (GET /models filtered by these).
const MODEL_TASKS = {
  "detect": ["detection", "instance-segmentation"],
  "segment": ["semantic-segmentation", "instance-segmentation"],
  "classify-video": ["video-classification", "temporal-localization"],
  "explain": ["classification", "detection", "instance-segmentation", "video-classification"],
};
const POLL_MS = 500;   // how often a 202 job's status_url is read
const MASK_ALPHA = 150; // label-map overlay opacity, 0-255

// Distinct colours for boxes and segmentation classes, picked by index.
const COLOURS = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
  [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
  [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
];
const colour = (i) => COLOURS[((i % COLOURS.length) + COLOURS.length) % COLOURS.length];
const rgb = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("form"), drop: $("drop"), dropText: $("drop-text"), file: $("file"),
  task: $("task"), model: $("model"), threshold: $("score-threshold"),
  method: $("method"), localize: $("localize"), send: $("send"),
  status: $("status"), progress: $("progress"), timing: $("timing"), error: $("error"),
  result: $("result"), apiKey: $("api-key"),
};

let models = [];        // GET /models' list

// JSON answers, and the API key when the service needs one (CVSERVE_API_KEYS); the key is
// kept in this browser's session storage only.
function headers() {
  const key = ui.apiKey.value.trim();
  return key ? { Accept: "application/json", Authorization: `Bearer ${key}` }
    : { Accept: "application/json" };
}
let chosen = null;      // the File to send
let fileUrl = null;     // its object URL, shown under the overlays
let requestSeq = 0;     // answers to an older request than the latest are dropped

// --- small DOM helpers -----------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
const pct = (value, total) => `${(100 * value) / total}%`;
const fmt = (x, digits = 2) => Number(x).toFixed(digits);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- form --------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const res = await fetch("/models", { headers: headers() });
    if (!res.ok) throw new Error((await readJson(res)).error.message);
    models = (await res.json()).models;
  } catch (err) {
    showError(`could not list the models: ${err.message}`);
  }
  fillModels();
}

function fillModels() {
  const tasks = MODEL_TASKS[ui.task.value];
  const previous = ui.model.value;
  ui.model.replaceChildren(el("option", { value: "" }, "(default)"));
  for (const m of models.filter((m) => tasks.includes(m.task))) {
    ui.model.append(el("option", { value: m.name }, `${m.name} (${m.task}, ${m.weights_kind})`));
  }
  ui.model.value = [...ui.model.options].some((o) => o.value === previous) ? previous : "";
}

// Show only the options of the selected task (elements tagged data-for="task ...").
function showOptions() {
  for (const node of document.querySelectorAll("[data-for]")) {
    node.hidden = !node.dataset.for.split(" ").includes(ui.task.value);
  }
}

function setFile(file) {
  if (!file) return;
  chosen = file;
  if (fileUrl) URL.revokeObjectURL(fileUrl);
  fileUrl = URL.createObjectURL(file);
  ui.dropText.textContent = `${file.name} (${file.type || "unknown type"}, ${fmt(file.size / 1024, 1)} KiB)`;
  // A sensible task for the file; the user may still change it.
  if (file.type.startsWith("video/")) ui.task.value = "classify-video";
  else if (file.type.startsWith("image/")) ui.task.value = "detect";
  ui.send.disabled = false;
  fillModels();
  showOptions();
}

function requestUrl(task) {
  const params = new URLSearchParams();
  if (ui.model.value) params.set("model", ui.model.value);
  if ((task === "detect" || task === "segment") && ui.threshold.value !== "") {
    params.set("score_threshold", ui.threshold.value);
  }
  if (task === "explain" && ui.method.value) params.set("method", ui.method.value);
  if (task === "classify-video" && ui.localize.checked) params.set("localize", "true");
  const query = params.toString();  // URLSearchParams encodes gradcam++'s "+" as %2B
  return `/${task}${query ? `?${query}` : ""}`;
}

// --- request -----------------------------------------------------------------------------------
async function readJson(res) {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    return { error: { code: String(res.status), message: text || res.statusText } };
  }
}

const failure = (body, res) =>
  (body && body.error && body.error.message) || `HTTP ${res.status} ${res.statusText}`;

async function send() {
  const seq = ++requestSeq;
  const task = ui.task.value;
  const file = chosen;
  const url = fileUrl;
  clearResult();
  setStatus("running");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const res = await fetch(requestUrl(task), {
      method: "POST", body: form, headers: headers(),
    });
    let body = await readJson(res);
    if (res.status === 202 && body.status_url) body = await poll(body.status_url, seq);
    else if (!res.ok) throw new Error(failure(body, res));
    if (seq !== requestSeq) return;
    await render(task, body, file, url);
    if (seq !== requestSeq) return;
    const total = body.timing && body.timing.total;
    ui.timing.textContent = total != null ? `total ${fmt(total, 1)} ms` : "";
    setStatus("done");
  } catch (err) {
    if (seq === requestSeq) showError(err.message);
  }
}

// A detached job (202): read its status every POLL_MS until it is done or failed.
async function poll(statusUrl, seq) {
  for (;;) {
    const res = await fetch(statusUrl, { headers: headers() });
    const job = await readJson(res);
    if (!res.ok) throw new Error(failure(job, res));
    if (seq !== requestSeq) throw new Error("superseded");
    const { done, total } = job.progress || {};
    ui.progress.textContent = `${job.status}: ${done ?? 0} / ${total ?? "?"} clips`;
    if (job.status === "done") return job.result;
    if (job.status === "failed") throw new Error(job.error ? job.error.message : "the job failed");
    setStatus(job.status);
    await sleep(POLL_MS);
  }
}

function setStatus(text) {
  ui.status.textContent = text;
}

function clearResult() {
  ui.result.replaceChildren();
  ui.error.hidden = true;
  ui.error.textContent = "";
  ui.progress.textContent = "";
  ui.timing.textContent = "";
}

function showError(message) {
  clearResult();
  ui.error.textContent = message;
  ui.error.hidden = false;
  setStatus("error");
}

// --- rendering ---------------------------------------------------------------------------------
async function render(task, answer, file, url) {
  const isVideo = file.type.startsWith("video/") || Boolean(answer.video);
  const stage = el("div", { class: "stage" },
    isVideo ? el("video", { src: url, controls: "", preload: "metadata" })
      : el("img", { src: url, alt: file.name }));
  const info = el("div", { class: "info" }, el("p", { class: "model" }, `model: ${answer.model}`));
  // The media column holds the stage and, for videos, the timeline under it (same width).
  ui.result.append(el("div", { class: "media" }, stage), info);

  if (task === "classify-video") {
    renderVideo(stage, info, answer);
  } else if (task === "explain") {
    renderExplanation(stage, info, answer);
  } else if (answer.label_map) {
    await drawLabelMap(stage, info, answer);
  } else {
    drawBoxes(stage, answer.detections || [], answer.image);
    info.append(el("p", {}, `${(answer.detections || []).length} detections`));
  }
}

// One absolutely positioned .box per detection, in percent of the original image size, so
// that it follows the image at any displayed size.
function drawBoxes(stage, detections, size) {
  detections.forEach((d, i) => {
    const b = d.box;
    const box = el("div", {
      class: "box",
      style: {
        left: pct(b.x1, size.width), top: pct(b.y1, size.height),
        width: pct(b.x2 - b.x1, size.width), height: pct(b.y2 - b.y1, size.height),
        borderColor: rgb(colour(i)),
      },
    }, el("span", { class: "box-label", style: { background: rgb(colour(i)) } },
      `${d.label} ${fmt(d.score)}`));
    box.title = `${d.label} ${fmt(d.score, 4)}`;
    stage.append(box);
  });
}

// The PASCAL VOC palette that the server writes into the label map PNG (worker/masks.py):
// the browser decodes a palette PNG to these colours, so this maps a colour back to its
// class id. (A model with over 256 classes answers a 16-bit grey PNG that a canvas cannot
// read exactly; such maps are not drawn.)
function vocIds() {
  const ids = new Map();
  for (let i = 0; i < 256; i++) {
    let r = 0, g = 0, b = 0;
    for (let bit = 0; bit < 8; bit++) {
      r |= ((i >> (3 * bit)) & 1) << (7 - bit);
      g |= ((i >> (3 * bit + 1)) & 1) << (7 - bit);
      b |= ((i >> (3 * bit + 2)) & 1) << (7 - bit);
    }
    ids.set((r << 16) | (g << 8) | b, i);
  }
  return ids;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not decode the label map"));
    img.src = src;
  });
}

const isBackground = (label) => /^_*background_*$/i.test(label);

async function drawLabelMap(stage, info, answer) {
  const map = await loadImage(`data:image/png;base64,${answer.label_map.data}`);
  const canvas = el("canvas", { class: "overlay labelmap" });
  canvas.width = map.naturalWidth;
  canvas.height = map.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(map, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const d = pixels.data;
  const ids = vocIds();
  const hidden = new Set(answer.classes.filter((c) => isBackground(c.label)).map((c) => c.class_id));
  for (let p = 0; p < d.length; p += 4) {
    const id = ids.get((d[p] << 16) | (d[p + 1] << 8) | d[p + 2]) ?? 0;
    if (hidden.has(id)) {
      d[p + 3] = 0;
      continue;
    }
    const [r, g, b] = colour(id);
    d[p] = r; d[p + 1] = g; d[p + 2] = b; d[p + 3] = MASK_ALPHA;
  }
  ctx.putImageData(pixels, 0, 0);
  stage.append(canvas);

  const legend = el("ul", { class: "legend" });
  for (const c of answer.classes) {
    const swatch = el("span", { class: "swatch" });
    if (!hidden.has(c.class_id)) swatch.style.background = rgb(colour(c.class_id));
    legend.append(el("li", { class: "legend-item" }, swatch,
      `${c.label} ${fmt(100 * c.fraction, 1)}%`));
  }
  info.append(legend);
}

// Jet-like colour map: blue (0) - cyan - yellow - red (1).
function jet(v) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

// A heatmap grid as a small canvas that CSS stretches (smoothly) over its region.
function heatmapCanvas(heatmap) {
  const [h, w] = heatmap.shape;
  const canvas = el("canvas", { class: "heatmap" });
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  heatmap.data.forEach((row, y) => row.forEach((v, x) => {
    const [r, g, b] = jet(v);
    img.data.set([r, g, b, Math.round(255 * (0.3 + 0.4 * v))], 4 * (y * w + x));
  }));
  ctx.putImageData(img, 0, 0);
  return canvas;
}

function drawHeatmap(stage, heatmap, size) {
  const canvas = heatmapCanvas(heatmap);
  const [x1, y1, x2, y2] = heatmap.region || [0, 0, size.width, size.height];
  Object.assign(canvas.style, {
    left: pct(x1, size.width), top: pct(y1, size.height),
    width: pct(x2 - x1, size.width), height: pct(y2 - y1, size.height),
  });
  stage.append(canvas);
}

function scoreList(items, cls) {
  return el("ol", { class: "scores" },
    ...items.map((t) => el("li", { class: cls }, `${t.label} ${fmt(t.score, 3)}`)));
}

function renderExplanation(stage, info, answer) {
  info.append(el("p", {}, `method: ${answer.method}${answer.layer ? ` at ${answer.layer}` : ""}`));
  if (answer.heatmap) {  // an image classifier
    drawHeatmap(stage, answer.heatmap, answer.image);
    info.append(el("p", { class: "target" },
      `target: ${answer.target.label} ${fmt(answer.target.score, 3)}`), scoreList(answer.top, "top-label"));
  } else if (answer.detections) {  // a detector: one map per detection, the first drawn
    drawBoxes(stage, answer.detections, answer.image);
    const first = answer.detections[0];
    if (first) {
      drawHeatmap(stage, first.heatmap, answer.image);
      info.append(el("p", { class: "target" }, `map of: ${first.label} ${fmt(first.score)}`));
    } else {
      info.append(el("p", {}, "no detection above the threshold to explain"));
    }
  } else if (answer.clips) {  // a video model: per-clip, per-frame maps
    info.append(el("p", { class: "target" },
      `target: ${answer.target.label} ${fmt(answer.target.score, 3)}`), scoreList(answer.top, "top-label"));
    const clip = answer.clips[0];
    const frame = clip && clip.frames[Math.floor(clip.frames.length / 2)];
    if (frame) {  // the map of the clip's middle frame, beside the player (not over it)
      info.append(el("figure", { class: "frame-map" }, heatmapCanvas(frame.heatmap),
        el("figcaption", {}, `clip ${fmt(clip.start_s)}-${fmt(clip.end_s)} s, frame at ${fmt(frame.time_s)} s`)));
    }
  }
}

function renderVideo(stage, info, answer) {
  const video = stage.querySelector("video");
  const duration = answer.video.duration_s;
  info.append(scoreList(answer.top, "top-label"));
  const timeline = el("div", { class: "timeline", title: `0-${fmt(duration)} s` });
  (answer.segments || []).forEach((s) => {
    const seg = el("div", {
      class: "segment",
      title: `${s.label} ${fmt(s.start_s)}-${fmt(s.end_s)} s (score ${fmt(s.score, 3)})`,
      style: {
        left: pct(s.start_s, duration), width: pct(s.end_s - s.start_s, duration),
        background: rgb(colour(s.class_id)),
      },
    }, s.label);
    seg.addEventListener("click", () => { video.currentTime = s.start_s; });
    timeline.append(seg);
  });
  // A playhead that follows the player.
  const head = el("div", { class: "playhead" });
  timeline.append(head);
  video.addEventListener("timeupdate", () => { head.style.left = pct(video.currentTime, duration); });
  stage.after(timeline);  // under the player, as wide as it
  if (answer.segments && !answer.segments.length) info.append(el("p", {}, "no action segments found"));
  info.append(el("p", {}, `${fmt(duration)} s, ${answer.video.width}x${answer.video.height}, ` +
    `${answer.video.clips} clips`));
}

// --- wiring ------------------------------------------------------------------------------------
ui.file.addEventListener("change", () => setFile(ui.file.files[0]));
ui.task.addEventListener("change", () => { fillModels(); showOptions(); });
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (chosen) send();
});
for (const type of ["dragenter", "dragover"]) {
  ui.drop.addEventListener(type, (event) => { event.preventDefault(); ui.drop.classList.add("over"); });
}
ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
ui.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) setFile(file);
});
ui.apiKey.value = sessionStorage.getItem("cvserve-api-key") || "";
ui.apiKey.addEventListener("change", () => {
  sessionStorage.setItem("cvserve-api-key", ui.apiKey.value.trim());
  loadModels();
});
showOptions();
loadModels();
