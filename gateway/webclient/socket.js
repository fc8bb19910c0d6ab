// The live connection: a fresh single-use ticket per connect, reconnect with capped exponential backoff and
// jitter, and resume from the last seq of every conversation after each (re)connect.
import { api } from "./api.js";

const BACKOFF_MIN_MS = 500;    // first retry: quick, most drops are a broker restart
const BACKOFF_MAX_MS = 15_000; // cap: a long outage costs one attempt per ~15 s per tab

export class LiveSocket {
  constructor({ onEvent, onState, resumeState }) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.resumeState = resumeState; // () => {conversation_id: last_seq}
    this.ws = null;
    this.attempt = 0;
    this.stopped = false;
  }

  async connect() {
    this.stopped = false;
    this.onState(this.attempt ? "reconnecting" : "connecting");
    let ticket;
    try {
      ticket = (await api("POST", "/api/v1/auth/ws-ticket", {})).ticket;
    } catch (err) {
      if (err.status === 401) { this.onState("offline"); this.onEvent({ type: "auth.lost" }); return; }
      return this.retry();
    }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/?ticket=${encodeURIComponent(ticket)}`);
    this.ws = ws;
    ws.onmessage = (e) => {
      let frame;
      try { frame = JSON.parse(e.data); } catch { return; }
      if (frame.type === "ready") {
        this.attempt = 0;
        this.onState("live");
        const conversations = this.resumeState();
        if (Object.keys(conversations).length) this.sendNow({ type: "resume", conversations });
      }
      this.onEvent(frame);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) { this.onState("offline"); return; }
      if (e.code === 4008) this.onEvent({ type: "error", code: "rate_limited", message: "You are sending too fast; reconnecting shortly." });
      this.retry();
    };
  }

  retry() {
    if (this.stopped) return;
    this.onState("reconnecting");
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt++);
    setTimeout(() => this.connect(), ceiling / 2 + Math.random() * ceiling / 2);
  }

  sendNow(frame) { this.ws.send(JSON.stringify(frame)); }

  // Frames are not queued while disconnected: un-acked sends are re-sent by the page after "ready"
  // (the server deduplicates them by client_msg_id); typing and read frames are simply dropped.
  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.sendNow(frame);
    return true;
  }

  close() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }
}
