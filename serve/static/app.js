// xray-edge page: pick or drop images, POST them to /v1/predict, show one card per image with the film,
// its heatmap (a layer to toggle and fade) and the answer; click a film to enlarge it, zoom and pan.
// No framework, no build step, nothing from the network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
let meta = null;

function headers() {
  const key = sessionStorage.getItem("xray-api-key");
  return key ? { "X-API-Key": key } : {};
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Every probability the page shows goes through here: one decimal, but never "100.0 %" or "0.0 %" (a calibrated
 * model is never that sure): p >= 0.9995 reads "> 99.9 %", p < 0.0005 "< 0.1 %". The API keeps the numbers
 * (and the bars' widths use them). */
function percent(p) {
  const s = (100 * p).toFixed(1);
  if (p >= 0.9995 || s === "100.0") return "> 99.9 %";
  if (p < 0.0005 || s === "0.0" || s === "-0.0") return "< 0.1 %";
  return s + " %";
}
/** A share of images counted (verified accuracy, the guard's acceptance): all or none is exact, not rounded. */
function share(x) { return x === 1 ? "100 %" : x === 0 ? "0 %" : percent(x); }
window.xrayFormat = Object.freeze({ percent });  // for the page tests
function capital(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

async function loadMetadata() {
  const r = await fetch("/v1/metadata", { headers: headers() });
  if (r.status === 401) { $("keyform").hidden = false; $("model").textContent = "API key needed"; return; }
  if (!r.ok) { $("model").textContent = "model information unavailable (" + r.status + ")"; return; }
  meta = await r.json();
  $("keyform").hidden = true;
  const v = meta.verification || {};
  const acc = v["onnx_" + meta.precision + "_accuracy"];
  $("model").textContent = `${meta.model_name} · ${meta.precision} · classes: ${meta.classes.join(", ")}` +
    (acc !== undefined ? ` · verified accuracy ${share(acc)} on ${v.images} held-out images` : "");
  $("notice").textContent = meta.notice;
  const facts = $("facts");
  facts.replaceChildren();
  const rows = [["model file", meta.file], ["checkpoint sha256", meta.checkpoint_sha256], ["exported", meta.export_date],
    ["input", `${meta.image_spec.input_size} px, ${meta.image_spec.resize_mode}`],
    ["out-of-distribution guard", meta.ood_guard ? `${meta.ood_guard.score}, accepts ${share(meta.ood_guard.accept)} of in-distribution images` : "none"],
    ["heatmaps", meta.heatmaps ? "class activation maps" : "none (re-export with a current xray-export)"],
    ["why this model", meta.chosen_because || "the only one given"], ["onnxruntime", meta.onnxruntime]];
  for (const [k, val] of Object.entries(v)) rows.push(["verification: " + k, typeof val === "number" ? +val.toPrecision(4) : val]);
  for (const [k, val] of rows) { facts.append(el("dt", "", k), el("dd", "", String(val))); }
}

// ------------------------------------------------------------------ the heatmap's legend

const LEGEND_GENERIC = "Colour = where the model looked for this class, strongest in red.";
const LEGEND_PER_IMAGE = "(scaled per image: colours are not comparable between images or classes)";

/** The legend's parts: the colour ramp (style.css draws it) labelled low / high, the server's sentence
 * (/v1/metadata `heatmap.legend`; a generic one from a server without it) and, for maps scaled per image, why
 * colours cannot be compared. */
function legendParts() {
  const h = (meta && meta.heatmap) || {};
  const ramp = el("span", "ramp-row");
  const bar = el("span", "ramp");
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", "colour scale: blue low, cyan, yellow, red high");
  ramp.append(el("span", "lo", "low"), bar, el("span", "hi", "high"));
  const words = el("span", "legend-words");
  words.append(el("span", "legend-text", typeof h.legend === "string" && h.legend ? h.legend : LEGEND_GENERIC));
  if (h.scale === "per_image") words.append(" ", el("span", "legend-note", LEGEND_PER_IMAGE));
  return [ramp, words];
}

// ------------------------------------------------------------------ cards

/** The browser's own copy of the file when it can show the format (full resolution), else null. */
async function browserCopy(file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try { await img.decode(); return url; } catch { URL.revokeObjectURL(url); return null; }
}

function card(file, own) {
  const c = el("article", "card");
  c.dataset.file = file.name;
  c.view = { own, base: own, layer: null, on: false, opacity: 60 };
  const film = el("button", "film");
  film.type = "button";
  film.setAttribute("aria-label", "Enlarge " + file.name);
  film.disabled = true;  // until there is something to show
  const stack = el("span", "stack");
  const base = el("img", "base"), layer = el("img", "heat");
  base.alt = file.name;
  layer.alt = "";
  layer.hidden = true;
  stack.append(base, layer);
  film.append(stack, el("span", "noimg", own ? "" : "waiting for the server's rendering"));
  film.addEventListener("click", () => openViewer(c));

  const controls = el("div", "heatctls");
  controls.hidden = true;
  const toggle = el("input", "heat-toggle"), opacity = el("input", "opacity");
  toggle.type = "checkbox";
  opacity.type = "range"; opacity.min = 0; opacity.max = 100; opacity.step = 5; opacity.value = c.view.opacity;
  const tl = el("label"), ol = el("label");
  tl.append(toggle, " heatmap ", el("span", "heat-class"));
  ol.append("opacity ", opacity);
  const legend = el("div", "legend");
  legend.hidden = true;
  controls.append(tl, ol, legend);
  toggle.addEventListener("change", () => setHeat(c, toggle.checked, c.view.opacity));
  opacity.addEventListener("input", () => setHeat(c, c.view.on, +opacity.value));

  const body = el("div", "body");
  body.append(el("p", "pred", "classifying…"), el("p", "noheat"));
  c.append(el("p", "name", file.name), film, controls, body);
  if (own) showBase(c, own, "browser");
  return c;
}

function showBase(c, src, kind) {
  const film = c.querySelector(".film");
  c.view.base = src;
  c.dataset.view = kind;  // "browser": the file itself; "preview": the server's decoded rendering
  film.querySelector(".base").src = src;
  film.querySelector(".noimg")?.remove();
  film.disabled = false;
}

function setHeat(c, on, opacity) {
  c.view.on = on && !!c.view.layer;
  c.view.opacity = opacity;
  const layer = c.querySelector(".heat");
  layer.hidden = !c.view.on;
  layer.style.opacity = opacity / 100;
  c.querySelector(".legend").hidden = !c.view.on;  // what the colours mean, while they show
  c.querySelector(".heat-toggle").checked = c.view.on;
  c.querySelector(".opacity").value = opacity;
  c.dataset.heatmapOn = c.view.on ? "true" : "false";
  if (viewer.card === c) syncViewer();
}

function bars(probabilities) {
  const box = el("div", "bars");
  const best = Object.entries(probabilities).sort((a, b) => b[1] - a[1])[0][0];
  for (const [cls, p] of Object.entries(probabilities)) {
    const row = el("div", "bar" + (cls === best ? " top" : ""));
    const track = el("div", "track"), fill = el("div", "fill");
    fill.style.width = 100 * p + "%";  // the number itself, not its label
    track.append(fill);
    row.append(el("span", "cls", cls), track, el("span", "value", percent(p)));
    row.title = `${cls}: ${p}`;
    box.append(row);
  }
  return box;
}

function show(c, rec) {
  const pred = c.querySelector(".pred"), body = c.querySelector(".body"), noheat = c.querySelector(".noheat");
  if (!c.view.own && rec.preview) showBase(c, rec.preview, "preview");
  if (c.querySelector(".film").disabled) c.querySelector(".noimg").textContent = "no preview";
  if (rec.error) {
    c.classList.add("failed");
    pred.textContent = "could not read: " + rec.error.message;
    c.dataset.prediction = "";
    return;
  }
  c.dataset.prediction = rec.prediction;
  c.dataset.probability = rec.probability === null ? "" : String(rec.probability);
  if (rec.ood) {  // the guard flagged it: no class in the headline, the numbers only on request
    c.classList.add("ood");
    pred.textContent = "Not assessed: not like the training data";
    body.append(el("p", "reason", capital(rec.reason || "not like the training data: do not trust any class")));
    const anyway = el("details", "anyway");
    anyway.append(el("summary", "", "show anyway"), bars(rec.probabilities));
    body.append(anyway);
  } else {
    pred.textContent = rec.probability === null ? rec.prediction : `${rec.prediction} ${percent(rec.probability)}`;
    body.append(bars(rec.probabilities));
  }
  if (rec.heatmap) {
    c.view.layer = rec.heatmap;
    c.dataset.heatmapClass = rec.heatmap_class;
    c.querySelector(".heat").src = rec.heatmap;
    c.querySelector(".heat-class").textContent = "(" + rec.heatmap_class + ")";
    c.querySelector(".legend").replaceChildren(...legendParts());
    c.querySelector(".heatctls").hidden = false;
    setHeat(c, false, c.view.opacity);
  } else if (meta && meta.heatmaps) {
    noheat.textContent = rec.ood ? "No heatmap: not assessed." : "No heatmap.";
    body.append(noheat);  // after the reason
  }
  if (viewer.card === c) refreshViewer(c);
}

async function classify(files) {
  if (!files.length) return;
  await metaReady;  // the heatmap offer and --max-files come from /v1/metadata
  const max = meta ? meta.limits.max_files : 16;
  for (let i = 0; i < files.length; i += max) {
    const chunk = files.slice(i, i + max);
    const own = await Promise.all(chunk.map(browserCopy));
    const cards = chunk.map((f, k) => card(f, own[k]));
    $("results").prepend(...cards);  // newest batch first, in the order picked
    const form = new FormData();
    chunk.forEach((f) => form.append("file", f, f.name));
    const query = new URLSearchParams({ ood_action: "abstain" });
    if (own.some((u) => !u)) query.set("preview", "true");  // DICOM and the rest: the server renders them
    if (meta && meta.heatmaps) query.set("heatmap", "true");
    $("status").textContent = `classifying ${chunk.length} image(s)…`;
    let r, body;
    try {
      r = await fetch("/v1/predict?" + query, { method: "POST", body: form, headers: headers() });
      body = await r.json();
    } catch (e) {
      cards.forEach((c) => show(c, { error: { message: "no answer from the server (" + e + ")" } }));
      $("status").textContent = "the server did not answer";
      continue;
    }
    if (r.status === 401) { $("keyform").hidden = false; cards.forEach((c) => show(c, { error: { message: "API key needed" } })); continue; }
    if (body.predictions) body.predictions.forEach((rec, k) => show(cards[k], rec));
    else cards.forEach((c) => show(c, { error: { message: body.detail || ("HTTP " + r.status) } }));
    $("status").textContent = r.ok ? `done: ${chunk.length} image(s)` : (body.detail || "HTTP " + r.status);
  }
}

// ------------------------------------------------------------------ the enlarged view: zoom and pan

const viewer = { card: null, scale: 1, x: 0, y: 0, drag: null, fitted: false };

function naturalSize() { const b = $("vbase"); return [b.naturalWidth || 1, b.naturalHeight || 1]; }

function place() {
  $("vstack").style.transform = `translate(${viewer.x}px, ${viewer.y}px) scale(${viewer.scale})`;
  $("vzoom").textContent = Math.round(100 * viewer.scale) + "%";
  $("viewer").dataset.scale = viewer.scale;
}

/** The whole image in the stage, as large as it goes: a 2000 px film shrunk, a 336 px one enlarged. */
function fit() {
  const [w, h] = naturalSize(), stage = $("stage");
  viewer.scale = Math.min(stage.clientWidth / w, stage.clientHeight / h);
  viewer.x = (stage.clientWidth - w * viewer.scale) / 2;
  viewer.y = (stage.clientHeight - h * viewer.scale) / 2;
  place();
  viewer.fitted = true;  // until a zoom or a pan: a resized window (or a taller toolbar) fits again
}

function zoom(factor, cx, cy) {  // about the stage point (cx, cy); default: its centre
  const stage = $("stage");
  cx = cx ?? stage.clientWidth / 2; cy = cy ?? stage.clientHeight / 2;
  // 5 % to 16x, or beyond where the fitted view already is (a tiny image fitted, a huge one)
  const scale = Math.min(Math.max(16, viewer.scale), Math.max(Math.min(0.05, viewer.scale), viewer.scale * factor));
  viewer.x = cx - (cx - viewer.x) * scale / viewer.scale;
  viewer.y = cy - (cy - viewer.y) * scale / viewer.scale;
  viewer.scale = scale;
  viewer.fitted = false;
  place();
}

function syncViewer() {
  const c = viewer.card;
  $("vlayer").hidden = !c.view.on;
  $("vlegend").hidden = !c.view.on;
  $("vlayer").style.opacity = c.view.opacity / 100;
  $("vheat").checked = c.view.on;
  $("vopacity").value = c.view.opacity;
}

function refreshViewer(c) {  // also when the answer arrives while the film is already enlarged
  $("vheading").textContent = c.querySelector(".pred").textContent;
  $("vheading").classList.toggle("flagged", c.classList.contains("ood"));
  for (const e of document.querySelectorAll("#viewer .heatctl")) e.hidden = !c.view.layer;
  $("vlegend").replaceChildren(...(c.view.layer ? legendParts() : []));
  $("vlayer").src = c.view.layer || "";
  syncViewer();
}

function openViewer(c) {
  viewer.card = c;
  const base = $("vbase");
  base.alt = c.dataset.file;
  $("vtitle").textContent = c.dataset.file;
  refreshViewer(c);
  viewer.fitted = false;
  delete $("viewer").dataset.scale;  // set again once the image is fitted
  base.onload = () => {
    $("vstack").style.width = base.naturalWidth + "px";
    $("vstack").style.height = base.naturalHeight + "px";
    $("vnote").textContent = (c.dataset.view === "browser" ? "Your file as the browser shows it" :
      "The server's rendering of the file as the model read it (DICOM window and inversion applied), shrunk") +
      `: ${base.naturalWidth} × ${base.naturalHeight} px.` + (c.view.layer ? " The heatmap is where the model looked for its class." : "");
    fit();  // opens fitted to the window, whatever the image's size
  };
  base.src = c.view.base;
  $("viewer").showModal();
  $("stage").focus();
}

$("zin").addEventListener("click", () => zoom(1.25));
$("zout").addEventListener("click", () => zoom(0.8));
$("zfit").addEventListener("click", fit);
$("z1").addEventListener("click", () => zoom(1 / viewer.scale));
$("vclose").addEventListener("click", () => $("viewer").close());
$("vheat").addEventListener("change", () => setHeat(viewer.card, $("vheat").checked, viewer.card.view.opacity));
$("vopacity").addEventListener("input", () => setHeat(viewer.card, viewer.card.view.on, +$("vopacity").value));
$("viewer").addEventListener("close", () => { viewer.card = null; });
const stage = $("stage");
stage.addEventListener("wheel", (e) => {
  e.preventDefault();
  if (!e.deltaY) return;  // a sideways swipe is not a zoom
  const box = stage.getBoundingClientRect();
  zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - box.left, e.clientY - box.top);
}, { passive: false });
stage.addEventListener("pointerdown", (e) => {
  viewer.drag = { id: e.pointerId, x: e.clientX - viewer.x, y: e.clientY - viewer.y };
  stage.setPointerCapture(e.pointerId);
  stage.classList.add("dragging");
});
stage.addEventListener("pointermove", (e) => {
  if (!viewer.drag || viewer.drag.id !== e.pointerId) return;
  viewer.x = e.clientX - viewer.drag.x; viewer.y = e.clientY - viewer.drag.y;
  viewer.fitted = false;
  place();
});
new ResizeObserver(() => { if (viewer.card && viewer.fitted && $("vbase").complete) fit(); }).observe(stage);
for (const end of ["pointerup", "pointercancel"]) {
  stage.addEventListener(end, () => { viewer.drag = null; stage.classList.remove("dragging"); });
}
stage.addEventListener("keydown", (e) => {
  const step = 60, moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
  if (e.key in moves) { viewer.x += moves[e.key][0]; viewer.y += moves[e.key][1]; viewer.fitted = false; place(); }
  else if (e.key === "+" || e.key === "=") zoom(1.25);
  else if (e.key === "-") zoom(0.8);
  else if (e.key === "0") fit();
  else if (e.key === "1") zoom(1 / viewer.scale);
  else if (e.key === "h" && viewer.card.view.layer) setHeat(viewer.card, !viewer.card.view.on, viewer.card.view.opacity);
  else return;
  e.preventDefault();
});

// ------------------------------------------------------------------ picking files

$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); } });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify([...e.dataTransfer.files]); });
$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("xray-api-key", $("key").value.trim());
  metaReady = loadMetadata().catch(() => {});
});
let metaReady = loadMetadata().catch(() => {});  // a failed load is shown in #model; the page still works
