// What the camera page and the viewer page share: the token, API calls, ICE gathering.

// The token comes in the URL fragment (/#token=...), which browsers never send to a
// server; it is kept for this tab only and wiped from the address bar.
export function takeToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("token")) {
    sessionStorage.setItem("livestyle-token", fragment.get("token"));
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
  return sessionStorage.getItem("livestyle-token") || "";
}

export function setToken(token) {
  sessionStorage.setItem("livestyle-token", token);
}

export function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// fetch() that throws HttpError with the server's one-line reason on a non-2xx answer.
export async function call(path, token, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(token), ...(options.headers || {}) },
  });
  if (!response.ok) {
    let reason = response.statusText;
    try {
      const text = await response.text();
      try { reason = JSON.parse(text).error || reason; } catch { reason = text.trim() || reason; }
    } catch { /* keep the status text */ }
    throw new HttpError(response.status, reason);
  }
  return response;
}

// The server answers with all of its candidates at once (no trickle ICE), so the offer
// carries ours too: wait until gathering ends (host candidates only take milliseconds;
// the timeout bounds a slow STUN/TURN server).
export function gathered(pc, timeoutMs = 3000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

// ICE servers for RTCPeerConnection from GET /config (none unless the server has --ice-server).
export async function iceServers(token) {
  try {
    const config = await (await call("/config", token)).json();
    return { config, iceServers: config.ice_servers };
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) throw e;
    return { config: null, iceServers: [] };
  }
}

// Counts the frames a <video> element presents (requestVideoFrameCallback), for a frame
// rate measured where the viewer sees it, and the time from the last packet received to display.
export class FrameCounter {
  constructor(video) {
    this.video = video;
    this.frames = 0;
    this.windowFrames = [];
    this.displayDelays = [];
    this.running = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
    if (this.running) video.requestVideoFrameCallback((now, meta) => this.onFrame(now, meta));
  }

  onFrame(now, meta) {
    if (this.first === undefined) this.first = now;
    this.frames += 1;
    this.windowFrames.push(now);
    if (meta.receiveTime && meta.expectedDisplayTime) {
      this.displayDelays.push(meta.expectedDisplayTime - meta.receiveTime);
      if (this.displayDelays.length > 60) this.displayDelays.shift();
    }
    this.video.requestVideoFrameCallback((n, m) => this.onFrame(n, m));
  }

  // Frames presented per second over the last two seconds (or since the first frame).
  fps() {
    const now = performance.now();
    while (this.windowFrames.length && now - this.windowFrames[0] > 2000) this.windowFrames.shift();
    if (this.first === undefined) return 0;
    return this.windowFrames.length / (Math.max(250, Math.min(2000, now - this.first)) / 1000);
  }

  displayDelayMs() {
    if (!this.displayDelays.length) return null;
    const sorted = [...this.displayDelays].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  }
}
