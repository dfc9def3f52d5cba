// The page's noise, reproducible from ?seed= (demo/README.md gives the same recipe, and
// tests/test_demo.py reproduces it in Python):
//   - mulberry32(seed) gives uniform draws u in [0, 1): a uint32 divided by 2**32;
//   - uniform noise (arch seed) is one draw per value;
//   - normal noise (fast, dcgan, small) is Box-Muller with two draws per value, u1 then u2:
//     sqrt(-2 ln(1 - u1)) * cos(2 pi u2), in float64, then stored as float32.
"use strict";

/** A seeded uniform PRNG: each call returns the next draw in [0, 1). */
function mulberry32(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = ((t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t) >>> 0;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `count` noise values of `kind` ("uniform" or "normal") from `random`, as a Float32Array. */
function drawNoise(random, kind, count) {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    if (kind === "uniform") {
      out[i] = random();
    } else {
      const u1 = random();
      const u2 = random();
      out[i] = Math.sqrt(-2 * Math.log(1 - u1)) * Math.cos(2 * Math.PI * u2);
    }
  }
  return out;
}

/** `noise` with each digit's first value taken from `base`: a self-conditioned model's first
 * noise value picks the digit's cluster (its kind of digit), which walks and sliders keep. */
function keepClusters(noise, base, latentDim) {
  const out = noise.slice();
  for (let start = 0; start < out.length; start += latentDim) out[start] = base[start];
  return out;
}
