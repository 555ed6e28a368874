// roombus.js: the browser client of roombus (served by every gateway at /roombus.js).
// An ES module, no dependency, no build step. Same promises as the Python client: it
// reconnects forever (exponential backoff with jitter, over a list of URLs; at once to the next
// one on close 1012/1001), rejoins each room with `since`/`epoch`, delivers every stored
// message once, in stream order (dedupe by `seq`, a broken `prev` rejoins to heal), and resends
// unacked sends with the same `client_id` until stored. Events (EventTarget): state, hello,
// joined, notrecovered, message, transmit, ack, retrying, refused, error, presence, typing, dm,
// event. Each event's `detail` carries the data. See the README's "Clients" section.
const RESTART = new Set([1001, 1012]);
const RETRY_SEND = new Set(["unavailable", "not_stored", "rate_limited", "internal"]);
const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;
const TEXT_MAX = 4000;

export class RoombusError extends Error {
  constructor(code, message, extra = {}) { super(`${code}: ${message}`); this.code = code; Object.assign(this, extra); }
}

function wsUrl(url) {
  const u = new URL(url, globalThis.location ? location.href : undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  return u;
}

export class Client extends EventTarget {
  /** urls: one or several gateway URLs (default: this page's /ws). opts: user, token,
   *  tokenProvider (sync or async; called for a fresh token on close 4001/4002), backoffBase
   *  (ms, 500), backoffMax (ms, 15000), jitter ("full" | "equal"), keepalive (ms, 60000),
   *  requestTimeout (ms, 10000), sendTimeout (ms, 60000). Connects at once. */
  constructor(urls = "ws", opts = {}) {
    super();
    this.urls = (Array.isArray(urls) ? urls : [urls]).slice();
    Object.assign(this, { user: null, token: null, tokenProvider: null, backoffBase: 500,
      backoffMax: 15000, jitter: "full", keepalive: 60000, requestTimeout: 10000, sendTimeout: 60000 }, opts);
    this.state = "connecting"; this.me = null; this.verified = false; this.url = null;
    this.connects = 0; this.resends = 0; this.retryAt = 0; this.rooms = new Map();
    this._ws = null; this._turn = 0; this._attempt = 0; this._timer = null; this._stopped = false;
    this._outbox = new Map(); this._events = new Set(); this._replies = new Map(); this._joining = [];
    this._lastSent = 0; this._dmSeq = 0; this._ids = 0;
    this._prefix = "c" + Date.now().toString(36) + Math.floor(Math.random() * 2 ** 32).toString(36);
    this._ka = setInterval(() => this._keepalive(), Math.max(250, this.keepalive / 4));
    this._connect();
  }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
  _setState(state, extra = {}) { this.state = state; this._emit("state", { state, ...extra }); }
  get online() { return this.state === "online"; }
  /** When the last frame went out (ms since the epoch): pages that keep alive on their own. */
  get lastSent() { return this._lastSent; }

  // ---- connection ---------------------------------------------------------------------
  _connect() {
    if (this._stopped) return;
    clearTimeout(this._timer); this._timer = null;
    if (this.token == null && this.tokenProvider) {
      Promise.resolve().then(() => this.tokenProvider()).then(
        (t) => { this.token = t; this._open(); }, () => this._schedule(1006, "no token"));
      return;
    }
    this._open();
  }
  _open() {
    const base = this.urls[this._turn % this.urls.length];
    const u = wsUrl(base);
    if (this.token == null && this.user != null) u.searchParams.set("user", this.user);
    const ws = new WebSocket(u.href);
    this._ws = ws; let opened = 0;
    this._setState("connecting");
    ws.onopen = () => {
      if (this._ws !== ws) return;
      opened = Date.now(); this.url = base; this.connects++;
      if (this.token != null) this._raw(ws, "auth", { token: this.token });
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      let f; try { f = JSON.parse(ev.data); } catch { return; }
      if (f && typeof f.type === "string") this._dispatch(f.type, f.data && typeof f.data === "object" ? f.data : {});
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._lost();
      if (opened && Date.now() - opened > 10000) this._attempt = 0;
      if (ev.code === 4001 || ev.code === 4002) {
        if (!this.tokenProvider) { this._stop(ev.code, ev.reason); return; }
        this.token = null;
        if (ev.code === 4002) { this._connect(); return; }  // expired: a fresh one, at once
      } else {
        this._turn++;
        if (RESTART.has(ev.code) && opened) { this._connect(); return; }
      }
      this._schedule(ev.code, ev.reason);
    };
  }
  _schedule(code, reason) {
    const ceiling = Math.min(this.backoffMax, this.backoffBase * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    const delay = this.jitter === "equal" ? ceiling / 2 + Math.random() * (ceiling / 2) : Math.random() * ceiling;
    this.retryAt = Date.now() + delay;
    this._timer = setTimeout(() => this._connect(), delay);
    this._setState("offline", { code, reason, retryAt: this.retryAt });
  }
  _lost() {
    this._ws = null; this.me = null; this._joining = [];
    for (const r of this.rooms.values()) { r.joined = false; r.resyncing = false; }
    for (const [, q] of this._replies) for (const p of q.splice(0)) p.fail(new RoombusError("disconnected", "the connection dropped"));
  }
  _stop(code, reason) {
    this._stopped = true; clearTimeout(this._timer); this._timer = null;
    const err = new RoombusError(code ? "unauthorized" : "closed", reason || `closed ${code || ""}`, { closeCode: code });
    for (const out of this._outbox.values()) out.reject(err);
    this._outbox.clear();
    this._setState("stopped", { code, reason });
  }
  /** Reconnect now (after `online`, a "retry now" click), with a new `user` if given. */
  reconnect({ user } = {}) {
    if (user !== undefined) this.user = user;
    const ws = this._ws;
    if (ws && user === undefined && ws.readyState <= WebSocket.OPEN) return;
    this._stopped = false; this._attempt = 0;
    if (ws) { this._lost(); ws.close(1000, "reconnect"); }
    this._connect();
  }
  close() {
    clearInterval(this._ka);
    const ws = this._ws; this._ws = null;
    this._stop(0, "closed by the client");
    if (ws) ws.close(1000);
  }

  // ---- frames out -----------------------------------------------------------------------
  _raw(ws, type, data) { ws.send(JSON.stringify({ type, data })); this._lastSent = Date.now(); }
  /** Send one frame now if connected (false otherwise). */
  sendFrame(type, data) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return false;
    this._raw(this._ws, type, data);
    return true;
  }
  _keepalive() {  // the gateway closes a connection silent for IDLE_TIMEOUT (pongs do not count)
    if (this.online && Date.now() - this._lastSent > this.keepalive) this.sendFrame("unsubscribe", { events: ["keepalive"] });
  }
  _rejoin(r) {
    if (!this.online || this._joining.includes(r.name)) return;
    const data = { room: r.name };
    if (r.seq != null && !r.ephemeral) { data.since = r.seq; if (r.epoch) data.epoch = r.epoch; }
    r.askedSince = data.since ?? null; r.resyncing = true;
    this._joining.push(r.name);
    this.sendFrame("join", data);
  }
  _transmit(out) {
    if (!this.online) return;
    if (out.room != null) { const r = this.rooms.get(out.room); if (!r || !r.joined) return; }
    if (!this.sendFrame(out.kind, out.data)) return;
    if (out.sent++) this.resends++;
    this._emit("transmit", { clientId: out.clientId, room: out.room, resend: out.sent > 1 });
  }
  _stored(kind, data, room, { clientId, timeout } = {}) {
    if (this._stopped) return Promise.reject(new RoombusError("closed", "the client is stopped"));
    if (typeof data.text !== "string" || !data.text.length || data.text.length > TEXT_MAX)
      return Promise.reject(new RoombusError("invalid", `text must be 1 to ${TEXT_MAX} characters`));
    const cid = clientId || `${this._prefix}${(this._ids++).toString(36)}`;
    const prior = this._outbox.get(cid);
    if (prior) return prior.promise;
    const out = { kind, room, clientId: cid, data: { ...data, client_id: cid }, sent: 0, tries: 0 };
    out.promise = new Promise((resolve, reject) => {
      const done = () => { clearTimeout(out.timer); this._outbox.delete(cid); };
      out.resolve = (v) => { done(); resolve(v); };
      out.reject = (e) => { done(); reject(e); };
    });
    out.timer = setTimeout(() => out.reject(new RoombusError("timeout", `not acked within ${timeout ?? this.sendTimeout} ms`, { clientId: cid })), timeout ?? this.sendTimeout);
    this._outbox.set(cid, out);
    this._transmit(out);
    return out.promise;
  }
  /** Send `text` to `room`; resolves with the ack {client_id, id, seq} once stored. */
  send(room, text, opts) { return this._stored("chat.message", { room, text }, room, opts); }
  /** Transmit a pending send again now (e.g. a "retry" button); same client_id. */
  resend(clientId) { const out = this._outbox.get(clientId); if (out) this._transmit(out); }
  dm(to, text, opts) { return this._stored("dm", { to, text }, null, opts); }
  typing(room) { return this.sendFrame("typing", { room }); }

  _request(kind, data) {
    if (!this.online) return Promise.reject(new RoombusError("offline", "not connected"));
    return new Promise((resolve, reject) => {
      const q = this._replies.get(kind) || []; this._replies.set(kind, q);
      const p = { ok: (d) => { clearTimeout(p.t); resolve(d); }, fail: (e) => { clearTimeout(p.t); reject(e); } };
      p.t = setTimeout(() => { const i = q.indexOf(p); if (i >= 0) q.splice(i, 1); reject(new RoombusError("timeout", `no answer to ${kind}`)); }, this.requestTimeout);
      q.push(p);  // the gateway answers one connection's frames in order
      this.sendFrame(kind, data);
    });
  }
  /** One page: {room, messages (oldest first), has_more}. */
  history(room, { before, limit = 50 } = {}) {
    return this._request("history", before == null ? { room, limit } : { room, before, limit });
  }
  /** Every older message, newest first, paging backwards. */
  async *olderMessages(room, { before, limit = 50 } = {}) {
    for (;;) {
      const page = await this.history(room, { before, limit });
      for (let i = page.messages.length - 1; i >= 0; i--) yield page.messages[i];
      if (!page.has_more || !page.messages.length) return;
      before = page.messages[0].seq;
    }
  }
  presence(room) { return this._request("presence", { room }); }
  subscribe(events) { for (const e of events) this._events.add(e); this.sendFrame("subscribe", { events: [...events] }); }

  /** Join `room` (kept across reconnects); resolves at its first `joined`. */
  join(name, { since = null, epoch = null } = {}) {
    if (!NAME_RE.test(name)) return Promise.reject(new RoombusError("bad_name", "room names are 1-64 letters, digits, - or _"));
    let r = this.rooms.get(name);
    if (!r) {
      r = { name, seq: since, epoch, joined: false, ephemeral: false, resyncing: false, askedSince: null, duplicates: 0, gaps: 0, waiters: [] };
      this.rooms.set(name, r);
      this._rejoin(r);
    }
    if (r.joined) return Promise.resolve(r);
    return new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
  }
  leave(name) {
    if (this.rooms.delete(name)) this.sendFrame("leave", { room: name });
  }

  // ---- frames in ------------------------------------------------------------------------
  _reply(kind, d, err) {
    const p = (this._replies.get(kind) || []).shift();
    if (p) { if (err) p.fail(err); else p.ok(d); return true; }
    return false;
  }
  _dispatch(type, d) {
    const r = this.rooms.get(d.room);
    switch (type) {
      case "hello":
        this.me = String(d.user); this.verified = !!d.verified;
        this._setState("online");
        this._emit("hello", d);
        for (const room of this.rooms.values()) this._rejoin(room);
        if (this._events.size) this.sendFrame("subscribe", { events: [...this._events] });
        for (const out of this._outbox.values()) if (out.room == null) this._transmit(out);
        break;
      case "joined": this._onJoined(r, d); break;
      case "chat.message": if (r) this._onMessage(r, d); break;
      case "ack": {
        const out = this._outbox.get(d.client_id);
        if (out) { out.resolve(d); this._emit("ack", d); }
        break;
      }
      case "error": this._onError(r, d); break;
      case "presence":
        if (d.event === undefined && Array.isArray(d.members) && this._reply("presence", d)) break;
        this._emit("presence", d); break;
      case "history": case "dm.history": this._reply(type, d); break;
      case "dm":
        if (typeof d.seq === "number") { if (d.seq <= this._dmSeq) break; this._dmSeq = d.seq; }
        this._emit("dm", d); break;
      case "typing": case "event": this._emit(type, d); break;
      default: break;  // newer frame types: ignored
    }
  }
  _onJoined(r, d) {
    const i = this._joining.indexOf(d.room);
    if (i >= 0) this._joining.splice(i, 1);
    if (!r) { this.sendFrame("leave", { room: d.room }); return; }  // left while joining
    r.joined = true; r.resyncing = false; r.ephemeral = !!d.ephemeral;
    const first = r.waiters.length > 0;
    if (!r.ephemeral) {
      if (d.recovered === false && (r.askedSince != null || d.reason === "epoch"))
        this._emit("notrecovered", { room: r.name, reason: d.reason, seq: d.seq, missed: d.missed });
      if (typeof d.seq === "number") r.seq = d.seq;
      if (typeof d.epoch === "string") r.epoch = d.epoch;
    }
    r.askedSince = null;
    this._emit("joined", { ...d, first });
    for (const w of r.waiters.splice(0)) w.resolve(r);
    for (const out of this._outbox.values()) if (out.room === r.name) this._transmit(out);
  }
  _onMessage(r, m) {
    if (typeof m.seq !== "number") { this._emit("message", m); return; }  // ephemeral room
    if (r.resyncing || !r.joined) return;  // the rejoin's replay brings it
    if (r.seq != null && m.seq <= r.seq) { r.duplicates++; return; }
    if (r.seq != null && typeof m.prev === "number" && m.prev !== r.seq) {
      r.gaps++; r.resyncing = true;  // one is missing: never skip it, rejoin from where we are
      this.sendFrame("leave", { room: r.name });
      r.joined = false; this._rejoin(r);
      return;
    }
    r.seq = m.seq;
    this._emit("message", m);
  }
  _onError(r, d) {
    const code = String(d.code || "error"), message = String(d.message || "");
    const out = d.client_id != null ? this._outbox.get(d.client_id) : undefined;
    if (out) {
      if (RETRY_SEND.has(code)) {
        out.tries++;
        this._emit("retrying", { clientId: out.clientId, code, message });
        setTimeout(() => this._transmit(out), Math.min(5000, 250 * 2 ** out.tries));
      } else {
        this._emit("refused", { clientId: out.clientId, code, message });
        out.reject(new RoombusError(code, message, { clientId: out.clientId }));
      }
      return;
    }
    if (d.frame === "join" && this._joining.length) {
      const jr = this.rooms.get(this._joining.shift());
      if (jr && RETRY_SEND.has(code)) { setTimeout(() => this._rejoin(jr), 1000); return; }
      if (jr) { this.rooms.delete(jr.name); for (const w of jr.waiters.splice(0)) w.reject(new RoombusError(code, message)); }
    } else if (d.left && r) {  // a replay was cut short: rejoin from where we are
      r.joined = false; setTimeout(() => this._rejoin(r), 500); return;
    } else if (typeof d.frame === "string" && this._reply(d.frame, null, new RoombusError(code, message, d))) {
      return;
    }
    this._emit("error", d);
  }
}
