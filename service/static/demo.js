// The demo page: reads /v1/models (a select when the service serves several), then draws from POST /generate/stream (Server-Sent Events over fetch, since
// EventSource cannot POST) and shows the previews forming, then the final images.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null; // the picked model, as /v1/models describes it
let models = []; // every served model
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function qualityRows() {
  const sweep = (model.card.quality && model.card.quality.sweep) || [];
  const d = model.defaults;
  return sweep.filter((r) => r.encoder_interval && r.steps === d.steps && r.guidance_scale === d.guidance_scale);
}

function fillForm() {
  const d = model.defaults;
  const cls = $("class_label");
  cls.length = 0;
  $("encoder_interval").length = 0;
  $("steps").readOnly = false;
  $("steps").removeAttribute("min");
  $("distilled-note").textContent = "";
  cls.add(new Option("unconditional", ""));
  const names = model.image.class_names;
  for (let c = 0; c < model.image.num_classes; c++) {
    cls.add(new Option(names ? c + " (" + names[c] + ")" : String(c), String(c)));
  }
  cls.value = model.image.num_classes > 7 ? "7" : "";
  const rows = qualityRows();
  const base = rows.find((r) => r.encoder_interval === 1);
  // A distilled few-step student (its card's "distilled"): its own steps only, K up to the one it was distilled with.
  const distilled = model.card.distilled;
  const ks = (rows.length ? rows.map((r) => r.encoder_interval) : [1, 2, 4, 8, 16].filter((k) => k <= d.steps))
    .filter((k) => !distilled || k <= distilled.encoder_interval);
  const kSel = $("encoder_interval");
  for (const k of ks) {
    const r = rows.find((x) => x.encoder_interval === k);
    let text = "K = " + k;
    if (r && r.fid != null) text += "  (FID " + r.fid.toFixed(2) + (base ? ", " + (r.fid / base.fid).toFixed(2) + "x K=1" : "") + ")";
    kSel.add(new Option(text, String(k)));
  }
  const auto = model.auto_encoder_interval;
  if (auto && auto.allowed && auto.allowed.length) {
    kSel.add(new Option("auto (K " + auto.allowed.join(" or ") + ", by load)", "auto"));
  }
  kSel.value = String(d.encoder_interval);
  $("guidance_scale").value = d.guidance_scale;
  $("steps").value = d.steps;
  $("steps").max = model.limits.max_steps;
  if (distilled) {
    $("steps").min = $("steps").max = distilled.steps;
    $("steps").readOnly = true;
    $("distilled-note").textContent = "A few-step student distilled from " + distilled.teacher + ": " +
      distilled.steps + " steps, the encoder every " + distilled.encoder_interval + " steps at most; the teacher's " +
      "guidance " + distilled.teacher_guidance + " is distilled in (guidance 1 samples as the teacher did).";
  }
  $("num_images").max = model.limits.max_images_per_request;
  $("num_images").value = Math.min(4, model.limits.max_images_per_request);
  $("preview_every").min = model.limits.min_preview_every;
  showCost();
  $("model-line").textContent = model.name + " on " + model.backend + " (" + model.device + "), " +
    model.image.output_width + "x" + model.image.output_height + " " +
    (model.image.png_mode === "L" ? "grayscale" : "RGB");
}

function showCost() {
  // The model card's quality figures for the K picked (for "auto": for each K it may pick), at the card's steps and
  // guidance, and a note when the form asks for other steps than those the figures were measured at.
  const rows = qualityRows();
  const d = model.defaults;
  const base = rows.find((x) => x.encoder_interval === 1);
  const picked = $("encoder_interval").value;
  const ks = picked === "auto" ? (model.auto_encoder_interval.allowed || []) : [Number(picked)];
  const shown = ks.map((k) => rows.find((x) => x.encoder_interval === k)).filter((r) => r && r.fid != null);
  if (!shown.length || !base) {
    $("k-cost").textContent = "";
    return;
  }
  const one = (r) => "K = " + r.encoder_interval + ": FID " + r.fid.toFixed(2) + (r.fid_std != null ? " ± " + r.fid_std.toFixed(2) : "") +
    ", " + r.gflops_per_image.toFixed(2) + " GFLOPs per image";
  let text = (picked === "auto" ? "auto picks K by load. " : "") + "Model card (N = " + d.steps + " steps, guidance " +
    d.guidance_scale + "): " + shown.map(one).join("; ") + " (K = 1: FID " + base.fid.toFixed(2) + ", " +
    base.gflops_per_image.toFixed(2) + " GFLOPs).";
  const steps = Number($("steps").value);
  if (steps && steps !== d.steps) text += " These figures are for N = " + d.steps + "; you asked for N = " + steps + ".";
  $("k-cost").textContent = text;
}

// A blank tile in the picture's shape until its first preview arrives (an <img> without a picture would show the
// browser's broken-image icon and its alt text).
const PLACEHOLDER = "data:image/svg+xml," + encodeURIComponent(
  '<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"><rect width="1" height="1" fill="#1b1b1b"/></svg>');

function cells(n) {
  const box = $("images");
  box.innerHTML = "";
  box.dataset.previews = "0";
  box.dataset.done = "false";
  const out = [];
  for (let i = 0; i < n; i++) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = "image " + i;
    img.src = PLACEHOLDER;
    img.className = "placeholder";
    img.style.aspectRatio = model.image.output_width + " / " + model.image.output_height;
    const cap = document.createElement("figcaption");
    cap.textContent = "waiting";
    fig.append(img, cap);
    box.append(fig);
    out.push({ img, cap });
  }
  return out;
}

async function* sseEvents(response) {
  // Server-Sent Events framing: lines "event: x" / "data: y", an empty line ends an event.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function requestBody() {
  const num = (id) => Number($(id).value);
  const body = {
    class_label: $("class_label").value === "" ? null : num("class_label"),
    num_images: num("num_images"),
    steps: num("steps"),
    encoder_interval: $("encoder_interval").value === "auto" ? "auto" : num("encoder_interval"),
    guidance_scale: num("guidance_scale"),
    preview_every: num("preview_every"),
  };
  if ($("seed").value !== "") body.seed = num("seed");
  if ($("priority").value !== "") body.priority = $("priority").value;
  if (models.length > 1) body.model = model.name;
  return body;
}

async function generate(ev) {
  ev.preventDefault();
  // The form is filled from /v1/model: with an API key just typed, that read may still be under way (or not yet
  // started); wait for it rather than send empty fields.
  if (!(await ensureModel())) return;
  const body = requestBody();
  const figs = cells(body.num_images);
  const t0 = performance.now();
  let previews = 0;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("summary").textContent = "";
  $("progress").value = 0;
  setStatus("sending…");
  controller = new AbortController();
  try {
    const r = await fetch("/generate/stream", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ message: r.statusText }));
      const fields = (err.details || []).map((d) => d.field + ": " + d.message).join("; ");
      setStatus("Error " + r.status + ": " + err.message + (fields ? " (" + fields + ")" : ""), true);
      return;
    }
    for await (const { event, data } of sseEvents(r)) {
      if (event === "queued") {
        setStatus(data.position ? "queued behind " + data.position + " request(s)" : "starting");
      } else if (event === "progress") {
        $("progress").value = data.step / data.of;
        setStatus("step " + data.step + " of " + data.of + " · encoder calls " + data.encoder_calls +
                  " · images done " + data.images_done + "/" + data.num_images);
      } else if (event === "preview") {
        const f = figs[data.index];
        f.img.src = "data:image/png;base64," + data.png_base64;
        f.img.className = "preview";
        f.cap.textContent = "step " + data.step;
        previews += 1;
        $("images").dataset.previews = String(previews);
      } else if (event === "done") {
        data.images.forEach((im, i) => {
          figs[i].img.src = "data:image/png;base64," + im.png_base64;
          figs[i].img.className = "final";
          figs[i].cap.textContent = "seed " + im.seed;
        });
        $("images").dataset.done = "true";
        $("progress").value = 1;
        const secs = ((performance.now() - t0) / 1000).toFixed(2);
        setStatus("done in " + secs + " s");
        $("summary").textContent = data.images.length + " image(s), " + data.steps + " steps, K = " +
          data.encoder_interval + (data.encoder_interval_auto ? " (picked by the service)" : "") + ": " + data.encoder_calls + " encoder calls and " + data.denoiser_calls +
          " light-network calls per image; server time " + (data.timings.total_ms / 1000).toFixed(2) + " s (queue " +
          (data.timings.queue_ms / 1000).toFixed(2) + " s); " + previews + " previews.";
      } else if (event === "error") {
        setStatus("Error " + data.status + " (" + data.error + "): " + data.message, true);
      }
    }
  } catch (e) {
    setStatus(e.name === "AbortError" ? "cancelled" : "connection failed: " + e.message, e.name !== "AbortError");
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
    controller = null;
  }
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) {
    $("model-line").textContent = "could not read /v1/models (" + r.status + ")" +
      (r.status === 401 ? ": enter the API key" : "");
    $("model-line").className = "error";
    return null;
  }
  const listing = await r.json();
  models = listing.models;
  const sel = $("model");
  for (const m of models) sel.add(new Option(m.name + " (" + m.image.format + ")", m.name));
  sel.value = listing.default;
  $("model-field").hidden = models.length < 2;
  model = models.find((m) => m.name === listing.default);
  $("model-line").className = "muted";
  fillForm();
  return model;
}

function pickModel() {
  model = models.find((m) => m.name === $("model").value) || model;
  fillForm();
}

let loading = null;

function ensureModel() {
  // One read of /v1/model at a time; the form is filled once.
  if (model) return Promise.resolve(model);
  if (!loading) loading = loadModel().finally(() => { loading = null; });
  return loading;
}

function init() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => controller && controller.abort());
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
  $("encoder_interval").addEventListener("change", showCost);
  $("steps").addEventListener("input", () => model && showCost());
  $("api_key").addEventListener("change", ensureModel);
  $("model").addEventListener("change", pickModel);
  ensureModel();
}

init();
