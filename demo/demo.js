// The Digitscape generator in the browser, run by onnxruntime-web (wasm) from node_modules.
// The model is model/generator.onnx, with model/generator.json beside it (demo/README.md).
"use strict";

const MODEL_URL = "model/generator.onnx";
const INFO_URL = "model/generator.json";
const ORT_DIST = "node_modules/onnxruntime-web/dist/";
const ROWS = 10;
const COLS = 10;
const DIGITS = ROWS * COLS;
const SIDE = 28; // pixels of a digit
const DIRECTIONS = 3; // sliders, each moving every digit's noise along one fixed direction
const WALK_FRAMES = 24; // frames from one point of the latent walk to the next
const NUMBER = new Intl.NumberFormat("en-US");

class DemoError extends Error {}

const $ = (id) => document.getElementById(id);

/** Shows `message` in place of the page, as an error that says what to do. */
function fail(message) {
  $("status").textContent = message;
  $("status").className = "error";
  $("app").hidden = true;
}

async function fetchOrFail(url, what) {
  let response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (e) {
    throw new DemoError(`Cannot reach ${url} (${e.message}). Is python demo/serve.py running?`);
  }
  if (!response.ok) {
    throw new DemoError(`The ${what} ${url} is missing (HTTP ${response.status}). ` +
      "Start the page with python demo/serve.py, which serves the shipped model, or " +
      "python demo/serve.py --model FILE.onnx for another (exported with " +
      "python sample.py --ckpt CKPT --export-onnx FILE.onnx).");
  }
  return response;
}

/** The model's description: what it takes, and which run it comes from. */
async function loadInfo() {
  const text = await (await fetchOrFail(INFO_URL, "model description")).text();
  let info;
  try {
    info = JSON.parse(text);
  } catch (e) {
    throw new DemoError(`The model description ${INFO_URL} is not valid JSON (${e.message}).`);
  }
  if (info === null || typeof info !== "object" || !Number.isInteger(info.latent_dim) ||
      !["uniform", "normal"].includes(info.noise) || typeof info.conditional !== "boolean") {
    throw new DemoError(`The model description ${INFO_URL} lacks latent_dim, noise or ` +
      "conditional: write it with python sample.py --ckpt CKPT --export-onnx FILE.onnx.");
  }
  return info;
}

async function loadSession() {
  if (typeof ort === "undefined") {
    throw new DemoError("onnxruntime-web did not load from " + ORT_DIST +
      ": run npm ci in demo/ (npm ci --prefix demo), then reload.");
  }
  ort.env.wasm.wasmPaths = new URL(ORT_DIST, location.href).href;
  ort.env.wasm.numThreads = 1; // no cross-origin isolation needed
  const bytes = new Uint8Array(await (await fetchOrFail(MODEL_URL, "model")).arrayBuffer());
  try {
    return await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  } catch (e) {
    throw new DemoError(`ONNX Runtime cannot load the model ${MODEL_URL} ` +
      `(${NUMBER.format(bytes.length)} bytes): ${e.message || e}. Export it again with ` +
      "python sample.py --ckpt CKPT --export-onnx FILE.onnx.");
  }
}

/** The seed from ?seed= (an integer in [0, 2**32)), or a fresh random one. */
function pageSeed() {
  const text = new URLSearchParams(location.search).get("seed");
  if (text !== null) {
    if (/^[0-9]{1,10}$/.test(text) && Number(text) < 2 ** 32) {
      return { seed: Number(text), note: "" };
    }
    const random = crypto.getRandomValues(new Uint32Array(1))[0];
    return { seed: random, note: `?seed=${text} is not an integer from 0 to 4294967295; ` };
  }
  return { seed: crypto.getRandomValues(new Uint32Array(1))[0], note: "" };
}

function describe(info) {
  const parts = [`arch ${info.arch}`, info.conditional ? "conditional" : "unconditional"];
  if (Number.isInteger(info.step)) parts.push(`${NUMBER.format(info.step)} steps`);
  if (typeof info.fd === "number" && typeof info.is === "number") {
    parts.push(`FD ${info.fd.toFixed(2)}`, `IS ${info.is.toFixed(2)}` +
      (info.eval_samples ? ` (on ${NUMBER.format(info.eval_samples)} digits` +
        (info.space ? `, ${info.space} feature space)` : ")") : ""));
  } else {
    parts.push("FD and IS not measured");
  }
  return parts.join(" · ");
}

/** Unit-length directions in noise space, from normal draws. */
function directions(random, latentDim) {
  return Array.from({ length: DIRECTIONS }, () => {
    const d = drawNoise(random, "normal", latentDim);
    const norm = Math.hypot(...d);
    return d.map((x) => x / norm);
  });
}

/** Spherical interpolation of each digit's noise (normal), straight lines for uniform. */
function interpolate(kind, a, b, t, latentDim) {
  const out = new Float32Array(a.length);
  for (let start = 0; start < a.length; start += latentDim) {
    let wa = 1 - t;
    let wb = t;
    if (kind === "normal") {
      let dot = 0, na = 0, nb = 0;
      for (let j = start; j < start + latentDim; j++) {
        dot += a[j] * b[j]; na += a[j] * a[j]; nb += b[j] * b[j];
      }
      const omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.sqrt(na * nb))));
      if (Math.sin(omega) > 1e-6) {
        wa = Math.sin((1 - t) * omega) / Math.sin(omega);
        wb = Math.sin(t * omega) / Math.sin(omega);
      }
    }
    for (let j = start; j < start + latentDim; j++) out[j] = wa * a[j] + wb * b[j];
  }
  return out;
}

class Demo {
  constructor(session, info, seed) {
    this.session = session;
    this.info = info;
    this.random = mulberry32(seed);
    this.base = drawNoise(this.random, info.noise, DIGITS * info.latent_dim);
    this.directions = directions(this.random, info.latent_dim);
    this.offsets = new Array(DIRECTIONS).fill(0);
    this.digit = null; // null: a row of each digit
    this.walk = null; // {from, to, frame} while walking
    this.nextFrame = 0; // the pending animation frame of the walk, if any
    this.dirty = false;
    this.busy = false;
    this.renders = 0;
    const canvas = $("grid");
    canvas.width = COLS * SIDE;
    canvas.height = ROWS * SIDE;
    this.context = canvas.getContext("2d");
  }

  /** The noise the grid draws now: the walk's point (or the base), moved by the sliders,
   * each digit keeping the base's cluster where the model has clusters. */
  noise() {
    const { latent_dim: latentDim, noise: kind } = this.info;
    const walk = this.walk;
    const noise = walk ? interpolate(kind, walk.from, walk.to, walk.frame / WALK_FRAMES, latentDim)
      : this.base.slice();
    const scale = kind === "normal" ? 1 : 1 / Math.sqrt(12); // the prior's standard deviation
    this.offsets.forEach((offset, k) => {
      if (offset === 0) return;
      for (let i = 0; i < noise.length; i++) {
        noise[i] += offset * scale * this.directions[k][i % latentDim];
      }
    });
    return this.keepingClusters(noise);
  }

  keepingClusters(noise) {
    return this.info.clusters ? keepClusters(noise, this.base, this.info.latent_dim) : noise;
  }

  labels() {
    return Int32Array.from({ length: DIGITS },
      (_, i) => this.digit === null ? Math.floor(i / COLS) % 10 : this.digit);
  }

  /** Asks for a redraw; redraws run one at a time, the latest request last. */
  request() {
    this.dirty = true;
    if (!this.busy) this.drain();
  }

  async drain() {
    this.busy = true;
    try {
      while (this.dirty) {
        this.dirty = false;
        await this.render();
      }
    } catch (e) {
      fail(`Running the model failed: ${e.message || e}`);
    } finally {
      this.busy = false;
    }
  }

  async render() {
    const feeds = {
      noise: new ort.Tensor("float32", this.noise(), [DIGITS, this.info.latent_dim]),
    };
    if (this.info.conditional) feeds.labels = new ort.Tensor("int32", this.labels(), [DIGITS]);
    const { images } = await this.session.run(feeds);
    const pixels = this.context.createImageData(COLS * SIDE, ROWS * SIDE);
    for (let i = 0; i < DIGITS; i++) {
      const top = Math.floor(i / COLS) * SIDE;
      const left = (i % COLS) * SIDE;
      for (let y = 0; y < SIDE; y++) {
        for (let x = 0; x < SIDE; x++) {
          const value = images.data[(i * SIDE + y) * SIDE + x];
          const grey = Math.min(255, Math.max(0, Math.round((value + 1) * 127.5)));
          const at = ((top + y) * COLS * SIDE + left + x) * 4;
          pixels.data.fill(grey, at, at + 3);
          pixels.data[at + 3] = 255;
        }
      }
    }
    this.context.putImageData(pixels, 0, 0);
    this.renders += 1;
    $("grid").dataset.renders = String(this.renders);
    if (this.walk) this.step();
  }

  /** The next frame of the latent walk: on to a fresh random point at each arrival. */
  step() {
    const walk = this.walk;
    walk.frame += 1;
    if (walk.frame === WALK_FRAMES) {
      walk.from = walk.to;
      walk.to = drawNoise(this.random, this.info.noise, walk.from.length);
      walk.frame = 0;
    }
    if (!this.nextFrame) {
      this.nextFrame = requestAnimationFrame(() => {
        this.nextFrame = 0;
        this.request();
      });
    }
  }

  toggleWalk() {
    if (this.walk) {
      const { from, to, frame } = this.walk;
      this.base = this.keepingClusters(
        interpolate(this.info.noise, from, to, frame / WALK_FRAMES, this.info.latent_dim));
      this.walk = null;
      cancelAnimationFrame(this.nextFrame);
      this.nextFrame = 0;
    } else {
      const to = drawNoise(this.random, this.info.noise, this.base.length);
      this.walk = { from: this.base, to, frame: 0 };
      this.request();
    }
    $("walk").textContent = this.walk ? "Stop the walk" : "Walk the latent space";
    $("walk").setAttribute("aria-pressed", String(Boolean(this.walk)));
  }

  newDigits() {
    this.base = drawNoise(this.random, this.info.noise, this.base.length);
    if (this.walk) {
      this.walk = { from: this.base, to: drawNoise(this.random, this.info.noise,
        this.base.length), frame: 0 };
    }
    this.request();
  }

  pick(digit) {
    this.digit = digit;
    for (const button of $("picker").querySelectorAll("button")) {
      button.setAttribute("aria-pressed",
        String(button.dataset.digit === (digit === null ? "all" : String(digit))));
    }
    this.request();
  }
}

function controls(demo) {
  $("new").addEventListener("click", () => demo.newDigits());
  $("walk").addEventListener("click", () => demo.toggleWalk());
  if (demo.info.conditional) {
    $("picker").hidden = false;
    for (const button of $("picker").querySelectorAll("button")) {
      const value = button.dataset.digit;
      button.addEventListener("click", () => demo.pick(value === "all" ? null : Number(value)));
    }
  } else {
    $("unconditional").hidden = false;
  }
  for (let k = 0; k < DIRECTIONS; k++) {
    const slider = $(`direction${k}`);
    slider.addEventListener("input", () => {
      demo.offsets[k] = Number(slider.value);
      $(`direction${k}-value`).textContent = Number(slider.value).toFixed(1);
      demo.request();
    });
  }
  $("reset").addEventListener("click", () => {
    for (let k = 0; k < DIRECTIONS; k++) {
      $(`direction${k}`).value = "0";
      $(`direction${k}-value`).textContent = "0.0";
      demo.offsets[k] = 0;
    }
    demo.request();
  });
}

async function main() {
  let session, info;
  try {
    info = await loadInfo();
    session = await loadSession();
  } catch (e) {
    fail(e instanceof DemoError ? e.message : `The page failed to start: ${e.message || e}`);
    return;
  }
  const { seed, note } = pageSeed();
  $("model").textContent = describe(info);
  $("seed").textContent = String(seed);
  $("seed").href = `?seed=${seed}`;
  $("status").textContent = note ? `${note}drew seed ${seed} instead.` : "";
  $("status").className = note ? "warning" : "";
  const demo = new Demo(session, info, seed);
  controls(demo);
  $("app").hidden = false;
  demo.request();
}

main();
