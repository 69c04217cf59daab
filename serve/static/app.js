// xray-edge page: pick or drop images, POST them to /v1/predict, show one card per image.
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

function pct(p) { return (100 * p).toFixed(1) + "%"; }

async function loadMetadata() {
  const r = await fetch("/v1/metadata", { headers: headers() });
  if (r.status === 401) { $("keyform").hidden = false; $("model").textContent = "API key needed"; return; }
  if (!r.ok) { $("model").textContent = "model information unavailable (" + r.status + ")"; return; }
  meta = await r.json();
  $("keyform").hidden = true;
  const v = meta.verification || {};
  const acc = v["onnx_" + meta.precision + "_accuracy"];
  $("model").textContent = `${meta.model_name} · ${meta.precision} · classes: ${meta.classes.join(", ")}` +
    (acc !== undefined ? ` · verified accuracy ${pct(acc)} on ${v.images} held-out images` : "");
  $("notice").textContent = meta.notice;
  const facts = $("facts");
  facts.replaceChildren();
  const rows = [["model file", meta.file], ["checkpoint sha256", meta.checkpoint_sha256], ["exported", meta.export_date],
    ["input", `${meta.image_spec.input_size} px, ${meta.image_spec.resize_mode}`],
    ["out-of-distribution guard", meta.ood_guard ? `${meta.ood_guard.score}, accepts ${pct(meta.ood_guard.accept)} of in-distribution images` : "none"],
    ["why this model", meta.chosen_because || "the only one given"], ["onnxruntime", meta.onnxruntime]];
  for (const [k, val] of Object.entries(v)) rows.push(["verification: " + k, typeof val === "number" ? +val.toPrecision(4) : val]);
  for (const [k, val] of rows) { facts.append(el("dt", "", k), el("dd", "", String(val))); }
}

function card(file) {
  const c = el("article", "card");
  c.dataset.file = file.name;
  const img = el("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  img.onerror = () => img.replaceWith(el("div", "noimg", /\.dcm$|\.dicom$/i.test(file.name) ? "DICOM" : "no preview"));
  const body = el("div");
  body.append(el("p", "name", file.name), el("p", "pred", "classifying…"), el("div", "bars"));
  c.append(img, body);
  $("results").prepend(c);
  return c;
}

function show(c, rec) {
  const pred = c.querySelector(".pred"), bars = c.querySelector(".bars");
  if (rec.error) {
    c.classList.add("failed");
    pred.textContent = "could not read: " + rec.error.message;
    c.dataset.prediction = "";
    return;
  }
  c.dataset.prediction = rec.prediction;
  c.dataset.probability = rec.probability === null ? "" : String(rec.probability);
  pred.textContent = rec.probability === null ? rec.prediction : `${rec.prediction} ${pct(rec.probability)}`;
  const best = Object.entries(rec.probabilities).sort((a, b) => b[1] - a[1])[0][0];
  for (const [cls, p] of Object.entries(rec.probabilities)) {
    const row = el("div", "bar" + (cls === best ? " top" : ""));
    const track = el("div", "track"), fill = el("div", "fill");
    fill.style.width = pct(p);
    track.append(fill);
    row.append(el("span", "cls", cls), track, el("span", "value", pct(p)));
    row.title = `${cls}: ${p}`;
    bars.append(row);
  }
  if (rec.ood) {  // the guard flagged it: say so next to the prediction, and why
    c.classList.add("ood");
    pred.textContent += " · not like the training data";
    const why = rec.reason || "not like the training data: do not trust the prediction";
    bars.append(el("p", "reason", why.charAt(0).toUpperCase() + why.slice(1)));
  }
}

async function classify(files) {
  if (!files.length) return;
  const max = meta ? meta.limits.max_files : 16;
  for (let i = 0; i < files.length; i += max) {
    const chunk = files.slice(i, i + max), cards = chunk.map(card);
    const form = new FormData();
    chunk.forEach((f) => form.append("file", f, f.name));
    $("status").textContent = `classifying ${chunk.length} image(s)…`;
    let r, body;
    try {
      r = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
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

$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify([...e.dataTransfer.files]); });
$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("xray-api-key", $("key").value.trim());
  loadMetadata();
});
loadMetadata();
