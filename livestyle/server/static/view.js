// The viewer page: plays one session's restyled video over WHEP, full window, for an OBS
// Browser Source. /view?session=KEY[&stats=1][&fit=cover][#token=T], where KEY is the
// session id the camera page shows, or the name a WHIP sender chose (?name=obs).
// It waits for a session that is not there yet and reconnects when one ends, so the
// source can stay in the OBS scene across restarts.

import { FrameCounter, HttpError, authHeaders, call, gathered, iceServers, takeToken } from "./common.js";

const params = new URLSearchParams(location.search);
const key = params.get("session") || "";
const video = document.getElementById("video");
const status = document.getElementById("status");
const overlay = document.getElementById("overlay");
const token = takeToken();
const RETRY_MS = 2000;

let pc = null;
let resource = null; // the WHEP resource to DELETE when leaving
let counter = null;
const stats = { state: "idle", frames: 0, fps: 0 };
window.livestyle = { stats };

if (params.get("fit") === "cover") video.classList.add("cover");
if (params.get("stats") === "1") overlay.hidden = false;

function show(text) {
  status.textContent = text;
  status.hidden = !text;
}

async function connect() {
  if (!key) {
    show("Add ?session=ID (the camera page shows it) or ?session=NAME (a WHIP sender's ?name=).");
    return;
  }
  stats.state = "connecting";
  try {
    const { iceServers: servers } = await iceServers(token);
    pc = new RTCPeerConnection({ iceServers: servers });
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => {
      video.srcObject = new MediaStream([event.track]);
      counter = new FrameCounter(video);
    };
    pc.onconnectionstatechange = () => {
      if (!pc) return;
      if (pc.connectionState === "connected") {
        stats.state = "playing";
        show("");
      } else if (["failed", "closed", "disconnected"].includes(pc.connectionState)) {
        retry("The stream ended; waiting for it to come back…");
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const response = await call(`/whep?session=${encodeURIComponent(key)}`, token, {
      method: "POST",
      headers: { "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    resource = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  } catch (e) {
    if (e instanceof HttpError && e.status === 404) retry(`Waiting for session ${key}…`);
    else if (e instanceof HttpError && e.status === 401) show("This server needs its token: add #token=… to the URL.");
    else retry(`${e.message || e}; retrying…`);
  }
}

function teardown() {
  if (resource) {
    fetch(resource, { method: "DELETE", headers: authHeaders(token), keepalive: true }).catch(() => {});
    resource = null;
  }
  if (pc) pc.close();
  pc = null;
}

function retry(text) {
  teardown();
  stats.state = "waiting";
  show(text);
  setTimeout(connect, RETRY_MS);
}

setInterval(() => {
  if (!counter) return;
  stats.frames = counter.frames;
  stats.fps = counter.fps();
  document.getElementById("fps").textContent = stats.fps.toFixed(0);
  document.getElementById("size").textContent = video.videoWidth ? `${video.videoWidth}×${video.videoHeight}` : "";
}, 1000);

window.addEventListener("pagehide", teardown);
connect();
