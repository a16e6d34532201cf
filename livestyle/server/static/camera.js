// The camera page: your camera to the server over WebRTC, the restyled video back, the
// look changed live over the `control` data channel, and a stats overlay.
//
// window.livestyle exposes the state for scripts and tests: start(), stop(), send(msg),
// stats (updated every second), sample() (mean colours of the camera and the output) and
// controlScales() (the ControlNet scales the page would send, 0 for those switched off).

import { FrameCounter, HttpError, call, gathered, iceServers, setToken, takeToken } from "./common.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"), output: $("output"), preview: $("preview"), placeholder: $("placeholder"),
  overlay: $("overlay"), start: $("start"), stop: $("stop"), camera: $("camera"), resolution: $("resolution"),
  codec: $("codec"), preset: $("preset"), presetDescription: $("preset-description"), prompt: $("prompt"),
  styles: $("styles"), negative: $("negative"), strength: $("strength"), strengthValue: $("strength-value"),
  seed: $("seed"), reseed: $("reseed"), temporal: $("temporal"), viewer: $("viewer"), viewerUrl: $("viewer-url"),
  copy: $("copy"), tokenBox: $("token-box"), token: $("token"), message: $("message"),
  controlnets: $("controlnets"), controlnetList: $("controlnet-list"),
};

let token = takeToken();
let presets = [];
let family = "demo";
let camera = null; // the MediaStream from getUserMedia
let pc = null;
let channel = null;
let session = null;
let counter = null;
let serverStats = null;
let statsTimer = null;
let previous = null; // the last getStats() figures, for rates
let controlnets = []; // the server's ControlNets: { name, scale, on } each, as the sliders show them

const stats = {
  state: "idle", session: null, fpsIn: 0, fpsOut: 0, framesOut: 0, framesDecoded: 0, latencyMs: null,
  dropped: 0, server: null, errors: [],
};

function say(text, isError = false) {
  ui.message.textContent = text;
  ui.message.classList.toggle("error", isError);
  if (isError) stats.errors.push(text);
}

function setState(state) {
  stats.state = state;
  ui.state.textContent = state;
  ui.state.dataset.state = state;
  ui.start.disabled = state === "connecting" || state === "connected";
  ui.stop.disabled = state === "idle";
}

// -- Presets and styles ------------------------------------------------------------------

async function loadPresets() {
  try {
    const data = await (await call("/presets", token)).json();
    presets = data.presets;
    family = data.family;
    ui.preset.replaceChildren(...presets.map((p) => new Option(p.name, p.name, false, p.name === data.default)));
    ui.styles.replaceChildren(...data.styles.map((s) => new Option(s)));
    ui.prompt.placeholder = family === "demo" ? `a style: ${data.styles.join(", ")}` : "describe the look";
    ui.negative.placeholder = family === "demo" ? "a style to move away from" : "what to avoid";
    showPreset(ui.preset.value);
    if (data.errors.length) say(data.errors.join("; "), true);
    showControlNets((await (await call("/config", token)).json()).controls || []);
  } catch (e) {
    handleError(e);
  }
}

// One row per ControlNet the server streams with: on/off and a scale slider. A client
// only sets their scales (by name); which ControlNets there are is the server's choice.
function showControlNets(list) {
  controlnets = list.map((c) => ({ name: c.name, scale: c.scale > 0 ? c.scale : 1, on: c.scale > 0 }));
  ui.controlnetList.replaceChildren(...list.map((c, i) => controlNetRow(c, controlnets[i])));
  ui.controlnets.hidden = list.length === 0;
}

function controlNetRow(info, state) {
  const label = document.createElement("label");
  label.className = "controlnet";
  const row = document.createElement("span");
  row.className = "row";
  const on = document.createElement("input");
  on.type = "checkbox";
  on.checked = state.on;
  on.title = "on or off";
  const name = document.createElement("span");
  name.textContent = `${info.name} (${info.input})`; // text, never markup: names come from file names
  name.title = name.textContent;
  const value = document.createElement("output");
  value.textContent = state.scale.toFixed(2);
  row.append(on, name, value);
  const slider = document.createElement("input");
  Object.assign(slider, { type: "range", min: "0", max: "2", step: "0.05", value: String(state.scale) });
  slider.disabled = !state.on;
  slider.addEventListener("input", () => {
    state.scale = Number(slider.value);
    value.textContent = state.scale.toFixed(2);
    sendScales();
  });
  on.addEventListener("change", () => {
    state.on = on.checked;
    slider.disabled = !on.checked;
    sendScales();
  });
  label.append(row, slider);
  return label;
}

function controlScales() {
  return Object.fromEntries(controlnets.map((c) => [c.name, c.on ? c.scale : 0]));
}

// Like the strength slider: at most one message per 80 ms, with every scale as it is then.
let scalesTimer = null;
function sendScales() {
  if (scalesTimer) return;
  scalesTimer = setTimeout(() => {
    scalesTimer = null;
    apply({ controls: controlScales() });
  }, 80);
}

function showPreset(name) {
  const preset = presets.find((p) => p.name === name);
  if (!preset) return;
  ui.presetDescription.textContent = preset.description;
  ui.prompt.value = family === "demo" ? preset.style : preset.prompt;
  ui.negative.value = preset.negative;
  ui.strength.value = preset.strength;
  ui.strengthValue.textContent = Number(preset.strength).toFixed(2);
  ui.seed.value = preset.seed;
  ui.temporal.checked = preset.temporal;
}

// -- Controls: JSON messages on the `control` data channel --------------------------------

let nextId = 1;
const pending = new Map();

function send(message) {
  if (!channel || channel.readyState !== "open") return Promise.resolve({ error: "not connected" });
  const id = nextId++;
  channel.send(JSON.stringify({ ...message, id }));
  return new Promise((resolve) => pending.set(id, resolve));
}

async function apply(message) {
  const reply = await send(message);
  if (reply.error) say(reply.error, true);
  else if (reply.settings) say("");
  return reply;
}

function onChannelMessage(event) {
  const message = JSON.parse(event.data);
  if (message.stats) {
    serverStats = message.stats;
    return;
  }
  const resolve = pending.get(message.id);
  pending.delete(message.id);
  if (resolve) resolve(message);
}

// The strength slider sends at most one message per 80 ms, and always its last value.
let strengthTimer = null;
ui.strength.addEventListener("input", () => {
  ui.strengthValue.textContent = Number(ui.strength.value).toFixed(2);
  if (strengthTimer) return;
  strengthTimer = setTimeout(() => {
    strengthTimer = null;
    apply({ strength: Number(ui.strength.value) });
  }, 80);
});
ui.preset.addEventListener("change", () => {
  showPreset(ui.preset.value);
  apply({ preset: ui.preset.value });
});
ui.prompt.addEventListener("change", () => apply({ prompt: ui.prompt.value }));
ui.negative.addEventListener("change", () => apply({ negative: ui.negative.value }));
ui.seed.addEventListener("change", () => apply({ seed: Number(ui.seed.value) }));
ui.reseed.addEventListener("click", () => {
  ui.seed.value = Math.floor(Math.random() * 2 ** 31);
  apply({ seed: Number(ui.seed.value) });
});
ui.temporal.addEventListener("change", () => apply({ temporal: ui.temporal.checked }));
ui.token.addEventListener("change", () => {
  token = ui.token.value.trim();
  setToken(token);
  loadPresets();
});
ui.copy.addEventListener("click", () => navigator.clipboard?.writeText(ui.viewerUrl.value));

// -- Camera ----------------------------------------------------------------------------

function constraints() {
  const [width, height] = ui.resolution.value.split("x").map(Number);
  const video = { width: { ideal: width }, height: { ideal: height }, frameRate: { ideal: 30 } };
  if (ui.camera.value) video.deviceId = { exact: ui.camera.value };
  return { video, audio: false };
}

async function openCamera() {
  const stream = await navigator.mediaDevices.getUserMedia(constraints());
  const devices = await navigator.mediaDevices.enumerateDevices();
  const current = stream.getVideoTracks()[0].getSettings().deviceId;
  const cameras = devices.filter((d) => d.kind === "videoinput");
  ui.camera.replaceChildren(...cameras.map((d, i) => new Option(d.label || `camera ${i + 1}`, d.deviceId, false,
    d.deviceId === current)));
  return stream;
}

async function switchCamera() {
  if (!camera || !pc) return;
  try {
    const next = await openCamera();
    const track = next.getVideoTracks()[0];
    const sender = pc.getSenders().find((s) => s.track && s.track.kind === "video");
    await sender.replaceTrack(track);
    camera.getTracks().forEach((t) => t.stop());
    camera = next;
    ui.preview.srcObject = camera;
  } catch (e) {
    handleError(e);
  }
}
ui.camera.addEventListener("change", switchCamera);
ui.resolution.addEventListener("change", async () => {
  if (!camera) return;
  const [width, height] = ui.resolution.value.split("x").map(Number);
  try {
    await camera.getVideoTracks()[0].applyConstraints({ width: { ideal: width }, height: { ideal: height } });
  } catch (e) {
    say(`the camera cannot do ${width} × ${height}: ${e.message}`, true);
  }
});

// -- The connection ----------------------------------------------------------------------

async function start() {
  if (pc) return;
  if (!window.isSecureContext) {
    say("The camera needs a secure context: open this page as http://localhost:PORT (an SSH tunnel) or over HTTPS.", true);
    return;
  }
  setState("connecting");
  say("");
  try {
    camera = await openCamera();
    ui.preview.srcObject = camera;
    ui.preview.hidden = false;
    const { iceServers: servers } = await iceServers(token);
    pc = new RTCPeerConnection({ iceServers: servers });
    const transceiver = pc.addTransceiver(camera.getVideoTracks()[0], { direction: "sendrecv" });
    if (ui.codec.value && RTCRtpReceiver.getCapabilities) {
      const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
      const preferred = codecs.filter((c) => c.mimeType.toLowerCase() === ui.codec.value.toLowerCase());
      const rest = codecs.filter((c) => c.mimeType.toLowerCase() !== ui.codec.value.toLowerCase());
      transceiver.setCodecPreferences([...preferred, ...rest.filter((c) => !/video\/(vp8|vp9|h264|av1|h265)/i.test(c.mimeType))]);
    }
    channel = pc.createDataChannel("control");
    channel.onmessage = onChannelMessage;
    channel.onopen = async () => {
      if (token) await send({ token });
      // The preset went with the offer; what the user changed since goes now.
      const changes = { strength: Number(ui.strength.value), seed: Number(ui.seed.value), temporal: ui.temporal.checked };
      if (ui.prompt.value) changes.prompt = ui.prompt.value;
      if (ui.negative.value) changes.negative = ui.negative.value;
      if (controlnets.length) changes.controls = controlScales();
      await apply(changes);
    };
    pc.ontrack = (event) => {
      // Show each frame as soon as it is decoded: a mirror, not a film.
      if ("jitterBufferTarget" in event.receiver) event.receiver.jitterBufferTarget = 0;
      ui.output.srcObject = new MediaStream([event.track]);
      counter = new FrameCounter(ui.output);
    };
    pc.onconnectionstatechange = () => {
      const state = pc?.connectionState;
      if (state === "connected") {
        setState("connected");
        ui.placeholder.hidden = true;
        ui.overlay.hidden = false;
      } else if (state === "failed" || state === "closed") {
        say(`The connection ${state}.`, true);
        stop();
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const answer = await (await call("/offer", token, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", preset: ui.preset.value }),
    })).json();
    session = answer.session;
    stats.session = answer.label;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    ui.viewerUrl.value = `${location.origin}/view?session=${encodeURIComponent(session)}`;
    ui.viewer.hidden = false;
    statsTimer = setInterval(updateStats, 1000);
  } catch (e) {
    handleError(e);
    stop();
  }
}

function stop() {
  clearInterval(statsTimer);
  statsTimer = null;
  channel = null;
  pending.forEach((resolve) => resolve({ error: "disconnected" }));
  pending.clear();
  if (pc) pc.close();
  pc = null;
  if (camera) camera.getTracks().forEach((t) => t.stop());
  camera = null;
  ui.output.srcObject = null;
  ui.preview.srcObject = null;
  ui.preview.hidden = true;
  ui.placeholder.hidden = false;
  ui.overlay.hidden = true;
  ui.viewer.hidden = true;
  session = null;
  previous = null;
  setState("idle");
}

function handleError(e) {
  if (e instanceof HttpError && e.status === 401) {
    ui.tokenBox.open = true;
    say("This server needs its access token (see below).", true);
  } else if (e instanceof HttpError && e.status === 503) {
    say(`The server is busy: ${e.message}. Try again in a moment.`, true);
  } else if (e && e.name === "NotAllowedError") {
    say("The camera was not allowed: allow it in the address bar and press Start again.", true);
  } else if (e && e.name === "NotFoundError") {
    say("No camera found.", true);
  } else {
    say(String(e && e.message ? e.message : e), true);
  }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
window.addEventListener("pagehide", stop);

// -- Stats ------------------------------------------------------------------------------

// End-to-end latency, estimated as the sum of its measured parts: the browser's encode
// time, the network both ways (ICE round trip), the server's arrival-to-restyled time
// plus the one frame its receiver holds (aiortc releases a frame when the next one
// starts), and the time from receiving a frame to showing it (requestVideoFrameCallback,
// or the jitter buffer and decode times). The browser cannot see the capture time of the
// frames it gets back, so this is an estimate; `python benchmarks/server_latency.py`
// measures it per frame.
async function updateStats() {
  if (!pc) return;
  const report = await pc.getStats();
  const now = {};
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") now.out = s;
    if (s.type === "inbound-rtp" && s.kind === "video") now.in = s;
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") now.pair = s;
  });
  const delta = (a, b, key) => (a && b && a[key] !== undefined && b[key] !== undefined ? a[key] - b[key] : 0);
  const encodeMs = previous && now.out
    ? 1000 * delta(now.out, previous.out, "totalEncodeTime") / Math.max(1, delta(now.out, previous.out, "framesEncoded"))
    : 0;
  const rttMs = now.pair && now.pair.currentRoundTripTime !== undefined ? 1000 * now.pair.currentRoundTripTime : 0;
  let receiveMs = counter ? counter.displayDelayMs() : null;
  if (receiveMs === null && now.in && now.in.jitterBufferEmittedCount) {
    receiveMs = 1000 * (now.in.jitterBufferDelay / now.in.jitterBufferEmittedCount
      + (now.in.totalDecodeTime || 0) / Math.max(1, now.in.framesDecoded));
  }
  stats.fpsIn = now.out?.framesPerSecond ?? 0;
  stats.fpsOut = counter ? counter.fps() : now.in?.framesPerSecond ?? 0;
  stats.framesOut = counter ? counter.frames : now.in?.framesDecoded ?? 0;
  stats.framesDecoded = now.in?.framesDecoded ?? 0;
  stats.server = serverStats;
  const server = serverStats && serverStats.latency_ms !== null ? serverStats.latency_ms : null;
  const held = serverStats && serverStats.fps_in > 0 ? 1000 / serverStats.fps_in : 0;
  stats.latencyMs = server === null ? null : Math.round(encodeMs + rttMs + server + held + (receiveMs || 0));
  stats.dropped = (serverStats ? serverStats.dropped + serverStats.send_dropped : 0) + (now.in?.framesDropped ?? 0);
  previous = now;

  $("fps-in").textContent = stats.fpsIn ? stats.fpsIn.toFixed(0) : "–";
  $("fps-out").textContent = stats.fpsOut.toFixed(0);
  $("latency").textContent = stats.latencyMs ?? "–";
  $("latency-box").title = `estimate: encode ${encodeMs.toFixed(0)} + network ${rttMs.toFixed(0)} + server ` +
    `${(server ?? 0).toFixed(0)} (+${held.toFixed(0)} receive buffer) + receive to display ${(receiveMs || 0).toFixed(0)} ms`;
  $("dropped").textContent = stats.dropped;
}

// Mean colours of the camera preview and the restyled output (8x6 samples), and their
// mean absolute difference: what a test reads to see that frames come back restyled.
function sample() {
  const mean = (video) => {
    if (!video.videoWidth) return null;
    const canvas = document.createElement("canvas");
    canvas.width = 8;
    canvas.height = 6;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(video, 0, 0, 8, 6);
    const data = context.getImageData(0, 0, 8, 6).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < data.length; i += 4) for (let c = 0; c < 3; c++) sum[c] += data[i + c];
    return { rgb: sum.map((v) => v / 48), pixels: Array.from(data) };
  };
  const a = mean(ui.preview);
  const b = mean(ui.output);
  const diff = a && b ? a.pixels.reduce((s, v, i) => s + Math.abs(v - b.pixels[i]), 0) / a.pixels.length : null;
  return { preview: a?.rgb ?? null, output: b?.rgb ?? null, diff };
}

window.livestyle = { start, stop, send, stats, sample, controlScales };
setState("idle");
loadPresets();
