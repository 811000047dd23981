// The search page: pick or drop a query image, drag a box on it (or use the whole image), see the ranked images
// with each winning box drawn. Plain DOM, no dependencies; talks to the JSON API of this server only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, image: null, scale: 1, box: null, drag: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function showInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    $("info").textContent = `${info.n_images} images · ${info.backbone} · levels ${info.levels.join(",")} · ` +
      `${info.index_kind}`;
    $("k").max = info.limits.max_k;
  } catch (error) {
    $("info").textContent = "index info unavailable";
  }
}

function loadQuery(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  const image = new Image();
  image.onload = () => {
    state.image = image;
    const canvas = $("query-canvas");
    const width = Math.min(image.naturalWidth, $("query-panel").clientWidth || 400);
    state.scale = image.naturalWidth / width;  // image pixels per canvas pixel
    canvas.width = width;
    canvas.height = Math.round(image.naturalHeight / state.scale);
    $("query-stage").hidden = false;
    draw();
    setStatus("Drag a box on the image, or press Whole image.");
  };
  image.onerror = () => setStatus(`${file.name}: the browser cannot show this file as an image`, true);
  image.src = URL.createObjectURL(file);
}

function draw() {
  const canvas = $("query-canvas");
  const context = canvas.getContext("2d");
  context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const box = state.drag || state.box;
  if (box) {
    const [x0, y0, x1, y1] = box.map((v) => v / state.scale);
    context.fillStyle = "rgba(0, 0, 0, 0.35)";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(state.image, box[0], box[1], box[2] - box[0], box[3] - box[1], x0, y0, x1 - x0, y1 - y0);
    context.strokeStyle = "#e67e22";
    context.lineWidth = 3;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  $("box-text").textContent = state.box ? `box ${state.box.join(",")}` : "";
}

function imagePoint(event) {
  // Pointer position in the image's own pixels, clamped to it.
  const rect = $("query-canvas").getBoundingClientRect();
  const sx = state.image.naturalWidth / rect.width;
  const sy = state.image.naturalHeight / rect.height;
  const x = Math.round((event.clientX - rect.left) * sx);
  const y = Math.round((event.clientY - rect.top) * sy);
  return [Math.max(0, Math.min(state.image.naturalWidth, x)), Math.max(0, Math.min(state.image.naturalHeight, y))];
}

function boxFrom(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function setupCanvas() {
  const canvas = $("query-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.image) return;
    canvas.setPointerCapture(event.pointerId);
    state.start = imagePoint(event);
    state.drag = boxFrom(state.start, state.start);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    state.drag = boxFrom(state.start, imagePoint(event));
    draw();
  });
  canvas.addEventListener("pointerup", (event) => {
    if (!state.drag) return;
    const box = boxFrom(state.start, imagePoint(event));
    state.drag = null;
    if (box[2] - box[0] >= 4 && box[3] - box[1] >= 4) {
      state.box = box;
      draw();
      search();
    } else {
      draw();
    }
  });
}

async function search() {
  if (!state.file) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("k", $("k").value || "12");
  if (state.box) form.append("box", state.box.join(","));
  setStatus("searching…");
  const started = performance.now();
  let response;
  try {
    response = await fetch("/api/search", { method: "POST", body: form });
  } catch (error) {
    setStatus(`the server did not answer (${error})`, true);
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    setStatus(`${response.status}: ${body.detail ? JSON.stringify(body.detail) : response.statusText}`, true);
    return;
  }
  const where = state.box ? `box ${state.box.join(",")}` : "whole image";
  setStatus(`${body.hits.length} results for the ${where} in ${Math.round(performance.now() - started)} ms`);
  showResults(body.hits);
}

function framed(hit, className) {
  // The image with its winning box, placed in percent of the image so it follows whatever size it is shown at.
  const frame = document.createElement("div");
  frame.className = className;
  const image = document.createElement("img");
  image.src = hit.url;
  image.alt = hit.name;
  const box = document.createElement("div");
  box.className = "box";
  const [x0, y0, x1, y1] = hit.box;
  Object.assign(box.style, {
    left: `${(100 * x0) / hit.width}%`, top: `${(100 * y0) / hit.height}%`,
    width: `${(100 * (x1 - x0)) / hit.width}%`, height: `${(100 * (y1 - y0)) / hit.height}%`,
  });
  frame.append(image, box);
  return frame;
}

function caption(hit) {
  return `#${hit.rank + 1} · score ${hit.score.toFixed(3)} · level ${hit.level} · ${hit.name}`;
}

function showResults(hits) {
  const results = $("results");
  results.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.id = hit.id;
    card.dataset.rank = hit.rank;
    const text = document.createElement("figcaption");
    text.className = "caption";
    text.innerHTML = `<b>#${hit.rank + 1}</b> score <b>${hit.score.toFixed(3)}</b>`;
    const name = document.createElement("div");
    name.className = "muted";
    name.textContent = `${hit.name} (level ${hit.level})`;
    text.append(name);
    card.append(framed(hit, "frame"), text);
    card.addEventListener("click", () => showLarge(hit));
    results.append(card);
  }
}

function showLarge(hit) {
  $("viewer-frame").replaceWith(Object.assign(framed(hit, "frame"), { id: "viewer-frame" }));
  $("viewer-caption").textContent = `${caption(hit)} · box ${hit.box.join(",")}`;
  $("viewer").showModal();
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => loadQuery(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    loadQuery(event.dataTransfer.files[0]);
  });
  $("whole").addEventListener("click", () => { state.box = null; draw(); search(); });
}

setupDrop();
setupCanvas();
showInfo();
