// ChatStream web client: plain ES modules, no build step. State lives in `state`; render functions
// rebuild the parts of the page that changed. All text goes in with textContent (never innerHTML).
import { api, ApiError, listOf, tokensLoad, tokensSave } from "./api.js";
import { LiveSocket } from "./socket.js";

const PAGE_SIZE = 30;
const TYPING_SHOW_MS = 4000;     // how long "x is typing" stays after the last typing frame
const TYPING_SEND_EVERY_MS = 2500; // at most one typing frame per this interval while typing
const READ_DEBOUNCE_MS = 400;

const $ = (id) => document.getElementById(id);
const state = {
  me: null,
  conversations: new Map(), // id -> {id, type, title, group_id, last_message, last_seq, unread, members, admins}
  current: null,
  messages: new Map(),      // conversation id -> Map(seq -> message)
  lastSeq: new Map(),       // conversation id -> highest event seq seen (for resume)
  oldestSeq: new Map(),     // conversation id -> lowest loaded seq (for paging up)
  exhausted: new Set(),     // conversations whose oldest page was loaded
  pending: new Map(),       // client_msg_id -> {conversation_id, content, createdAt}
  reads: new Map(),         // conversation id -> Map(user id -> seq)
  presence: new Map(),      // user id -> status
  typing: new Map(),        // conversation id -> Map(user id -> {until, name})
  names: new Map(),         // user id -> username
};
let socket = null;
let lastTypingSent = 0;
let readTimer = null;

// ------------------------------------------------------------------ notices

function notice(text, kind = "info") {
  const el = document.createElement("div");
  el.className = `notice ${kind}`;
  el.textContent = text;
  $("notices").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 6000 : 3500);
}

function explain(err) {
  if (err instanceof ApiError) {
    if (err.status === 429) return `Slow down: ${err.message}`;
    return err.message;
  }
  return "Network problem; please try again.";
}

// ------------------------------------------------------------------ views

function showAuth() {
  $("auth-view").hidden = false;
  $("chat-view").hidden = true;
  $("login-username").focus();
}

async function showChat() {
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  try {
    state.me = await api("GET", "/api/v1/users/me");
  } catch (err) {
    tokensSave(null);
    return showAuth();
  }
  state.names.set(String(state.me.id), state.me.username);
  $("me").textContent = `@${state.me.username}`;
  await loadConversations();
  socket = new LiveSocket({ onEvent: handleEvent, onState: setConnection, resumeState });
  socket.connect();
}

function setConnection(s) {
  const el = $("connection");
  el.dataset.state = s;
  el.textContent = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", offline: "offline" }[s] || s;
}

function resumeState() {
  const out = {};
  for (const [id, seq] of state.lastSeq) if (seq > 0) out[id] = seq;
  return out;
}

// ------------------------------------------------------------------ conversations

function titleOf(c) {
  if (c.title || c.name) return c.title || c.name;
  if (c.other_user) return c.other_user.username || c.other_user;
  if (c.other_username) return c.other_username;
  if (Array.isArray(c.members)) {
    const others = c.members.filter((m) => String(m.id || m) !== String(state.me.id)).map((m) => m.username || m);
    if (others.length) return others.join(", ");
  }
  return c.type === "group" ? "group" : "chat";
}

function normalizeConversation(raw) {
  const id = String(raw.id || raw.conversation_id);
  const prev = state.conversations.get(id) || {};
  const c = { ...prev, ...raw, id };
  c.title = titleOf(c);
  // The server counts persisted messages; live ones may not be persisted yet, so keep the larger count.
  c.unread = Math.max(Number(raw.unread ?? 0), Number(prev.unread ?? 0));
  if (id === state.current && document.visibilityState === "visible") c.unread = 0;
  if (Array.isArray(raw.members)) for (const m of raw.members) if (m && m.id && m.username) state.names.set(String(m.id), m.username);
  if (raw.read_cursors) state.reads.set(id, new Map(Object.entries(raw.read_cursors).map(([u, s]) => [u, Number(s)])));
  if (raw.other_user && raw.other_user.id) {
    state.names.set(String(raw.other_user.id), raw.other_user.username);
    if (raw.other_user.status) state.presence.set(String(raw.other_user.id), raw.other_user.status);
  }
  state.conversations.set(id, c);
  if (!state.lastSeq.has(id)) state.lastSeq.set(id, Number(raw.last_seq || 0));
  return c;
}

async function loadConversations() {
  try {
    const data = await api("GET", "/api/v1/conversations");
    for (const raw of listOf(data, "conversations")) normalizeConversation(raw);
    renderConversations();
  } catch (err) { notice(explain(err), "error"); }
}

function sortedConversations() {
  const when = (c) => (c.last_message && c.last_message.timestamp) || c.updated_at || "";
  return [...state.conversations.values()].sort((a, b) => (when(b) > when(a) ? 1 : when(b) < when(a) ? -1 : 0));
}

function otherMemberId(c) {
  if (c.type !== "single") return null;
  if (c.other_user && c.other_user.id) return String(c.other_user.id);
  if (Array.isArray(c.members)) {
    const other = c.members.map((m) => String(m.id || m)).find((m) => m !== String(state.me.id));
    return other || null;
  }
  return null;
}

function renderConversations() {
  const list = $("conversation-list");
  const focusedId = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.conversation;
  list.replaceChildren();
  for (const c of sortedConversations()) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.conversation = c.id;
    if (c.id === state.current) b.setAttribute("aria-current", "true");
    const other = otherMemberId(c);
    const online = other && state.presence.get(other) === "online";
    const dot = document.createElement("span");
    dot.className = `dot${online ? " online" : ""}`;
    dot.setAttribute("aria-hidden", "true");
    const name = document.createElement("span");
    name.className = "conv-name";
    name.textContent = c.title;
    const badge = document.createElement("span");
    if (c.unread > 0) { badge.className = "badge"; badge.textContent = String(c.unread); }
    const last = document.createElement("span");
    last.className = "conv-last";
    const lm = c.last_message;
    last.textContent = lm ? (lm.deleted ? "message deleted" : lm.content || "") : "no messages yet";
    b.append(dot, name, badge, last);
    const extra = [online ? "online" : null, c.unread ? `${c.unread} unread` : null].filter(Boolean).join(", ");
    b.setAttribute("aria-label", `${c.title}${extra ? ", " + extra : ""}`);
    b.addEventListener("click", () => openConversation(c.id));
    li.append(b);
    list.append(li);
  }
  if (focusedId) { const again = list.querySelector(`[data-conversation="${CSS.escape(focusedId)}"]`); if (again) again.focus(); }
}

// ------------------------------------------------------------------ messages

function store(conversationId) {
  if (!state.messages.has(conversationId)) state.messages.set(conversationId, new Map());
  return state.messages.get(conversationId);
}

function normalizeMessage(raw) {
  return {
    id: String(raw.id || raw.message_id),
    conversation_id: String(raw.conversation_id),
    seq: Number(raw.seq),
    sender_id: String(raw.sender_id),
    content: raw.content ?? "",
    timestamp: raw.timestamp,
    deleted: Boolean(raw.deleted),
    edited: Boolean(raw.edited_at || raw.edited),
    client_msg_id: raw.client_msg_id,
  };
}

function addMessage(m) {
  const msgs = store(m.conversation_id);
  for (const [seq, existing] of msgs) if (existing.id === m.id && seq !== m.seq) msgs.delete(seq);
  msgs.set(m.seq, { ...(msgs.get(m.seq) || {}), ...m });
  const oldest = state.oldestSeq.get(m.conversation_id);
  if (oldest === undefined || m.seq < oldest) state.oldestSeq.set(m.conversation_id, m.seq);
  bumpSeq(m.conversation_id, m.seq);
}

function bumpSeq(conversationId, seq) {
  if (seq > (state.lastSeq.get(conversationId) || 0)) state.lastSeq.set(conversationId, seq);
}

function findMessage(conversationId, messageId) {
  const msgs = conversationId ? [store(conversationId)] : [...state.messages.values()];
  for (const map of msgs) for (const m of map.values()) if (m.id === messageId) return m;
  return null;
}

async function loadPage(conversationId, { before } = {}) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (before) params.set("before_seq", String(before));
  const data = await api("GET", `/api/v1/conversations/${conversationId}/messages?${params}`);
  const page = listOf(data, "messages").map(normalizeMessage);
  for (const m of page) addMessage(m);
  if (page.length < PAGE_SIZE) state.exhausted.add(conversationId);
  return page.length;
}

async function openConversation(id) {
  state.current = id;
  $("chat-view").classList.add("in-chat");
  const c = state.conversations.get(id);
  $("chat-title").textContent = c ? c.title : "Conversation";
  $("group-tools").hidden = !(c && c.type === "group");
  $("composer-input").disabled = false;
  $("send").disabled = false;
  renderConversations();
  try {
    if (!state.messages.has(id) || store(id).size === 0) await loadPage(id);
  } catch (err) { notice(explain(err), "error"); }
  renderMessages({ stickToBottom: true });
  scheduleRead();
  $("composer-input").focus();
}

function seenBy(m) {
  const reads = state.reads.get(m.conversation_id);
  if (!reads) return false;
  for (const [user, seq] of reads) if (user !== String(state.me.id) && seq >= m.seq) return true;
  return false;
}

function renderMessages({ stickToBottom = false, keepOffsetFrom = null } = {}) {
  const list = $("messages");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.replaceChildren();
  if (!state.current) return;
  const msgs = [...store(state.current).values()].sort((a, b) => a.seq - b.seq);
  const pendings = [...state.pending.entries()].filter(([, p]) => p.conversation_id === state.current);
  const mineIds = new Set(msgs.map((m) => m.client_msg_id).filter(Boolean));
  let lastMineSeen = null;
  for (const m of msgs) if (m.sender_id === String(state.me.id) && seenBy(m)) lastMineSeen = m.seq;
  for (const m of msgs) list.append(messageItem(m, { seen: m.seq === lastMineSeen }));
  for (const [cid, p] of pendings) {
    if (mineIds.has(cid)) continue;
    list.append(messageItem({ id: cid, seq: 0, sender_id: String(state.me.id), content: p.content, pending: true }, {}));
  }
  if (keepOffsetFrom !== null) list.scrollTop = list.scrollHeight - keepOffsetFrom;
  else if (stickToBottom || nearBottom) list.scrollTop = list.scrollHeight;
}

function messageItem(m, { seen }) {
  const li = document.createElement("li");
  const mine = m.sender_id === String(state.me.id);
  li.className = `msg${mine ? " mine" : ""}${m.pending ? " pending" : ""}${m.deleted ? " deleted" : ""}`;
  li.dataset.seq = String(m.seq);
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  const conv = state.conversations.get(m.conversation_id || state.current);
  who.textContent = mine ? "you" : state.names.get(m.sender_id) || (conv && conv.type === "single" ? conv.title : "member");
  const when = document.createElement("time");
  if (m.timestamp) { when.dateTime = m.timestamp; when.textContent = new Date(m.timestamp).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }
  meta.append(who, when);
  if (m.edited && !m.deleted) { const e = document.createElement("span"); e.textContent = "edited"; meta.append(e); }
  if (m.pending) { const e = document.createElement("span"); e.textContent = "sending…"; meta.append(e); }
  if (seen) { const e = document.createElement("span"); e.className = "seen"; e.textContent = "seen"; meta.append(e); }
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = m.deleted ? "message deleted" : m.content;
  li.append(meta, body);
  if (mine && !m.pending && !m.deleted) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const edit = document.createElement("button");
    edit.type = "button"; edit.textContent = "edit"; edit.setAttribute("aria-label", "Edit message");
    edit.addEventListener("click", () => {
      const content = prompt("Edit message", m.content);
      if (content !== null && content.trim() && content !== m.content) socket.send({ type: "message.edit", message_id: m.id, content });
    });
    const del = document.createElement("button");
    del.type = "button"; del.textContent = "delete"; del.setAttribute("aria-label", "Delete message");
    del.addEventListener("click", () => { if (confirm("Delete this message?")) socket.send({ type: "message.delete", message_id: m.id }); });
    actions.append(edit, document.createTextNode(" "), del);
    li.append(actions);
  }
  return li;
}

function renderTyping() {
  const el = $("typing");
  const now = Date.now();
  const typers = state.typing.get(state.current);
  const names = typers ? [...typers.entries()].filter(([, t]) => t > now).map(([u]) => state.names.get(u) || "someone") : [];
  el.textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}
setInterval(renderTyping, 1000);

function scheduleRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const id = state.current;
    if (!id || document.visibilityState !== "visible") return;
    const seq = state.lastSeq.get(id) || 0;
    const mine = (state.reads.get(id) || new Map()).get(String(state.me.id)) || 0;
    const c = state.conversations.get(id);
    if (c && c.unread) { c.unread = 0; renderConversations(); }
    if (seq > mine && socket) socket.send({ type: "read", conversation_id: id, seq });
  }, READ_DEBOUNCE_MS);
}
document.addEventListener("visibilitychange", scheduleRead);

// ------------------------------------------------------------------ live events

function touchConversation(conversationId, message) {
  const c = state.conversations.get(conversationId);
  if (message) c.last_message = { ...message };
  if (c.title === "…") loadConversations();
  renderConversations();
}

function handleEvent(frame) {
  switch (frame.type) {
    case "ready":
      // Un-acked sends from before the drop go again; the server deduplicates by client_msg_id.
      for (const [cid, p] of state.pending) socket.send({ type: "message.send", conversation_id: p.conversation_id, client_msg_id: cid, content: p.content });
      loadConversations();
      break;
    case "message.new": {
      const m = normalizeMessage(frame.message || frame);
      const known = store(m.conversation_id).has(m.seq);
      addMessage(m);
      if (m.client_msg_id && m.sender_id === String(state.me.id)) state.pending.delete(m.client_msg_id);
      if (!state.conversations.has(m.conversation_id)) {
        // A conversation this page has not listed yet (just created by someone else): list it now.
        state.conversations.set(m.conversation_id, { id: m.conversation_id, type: "single", title: "…", unread: 0 });
      }
      const c = state.conversations.get(m.conversation_id);
      if (c && !known && m.sender_id !== String(state.me.id) && (m.conversation_id !== state.current || document.visibilityState !== "visible")) c.unread = (c.unread || 0) + 1;
      touchConversation(m.conversation_id, m);
      if (m.conversation_id === state.current) { renderMessages(); scheduleRead(); }
      break;
    }
    case "ack":
      state.pending.delete(frame.client_msg_id);
      bumpSeq(String(frame.conversation_id), Number(frame.seq));
      if (String(frame.conversation_id) === state.current) renderMessages();
      break;
    case "message.edited":
    case "message.deleted": {
      const data = frame.message || frame;
      const id = String(data.id || data.message_id);
      const conv = data.conversation_id ? String(data.conversation_id) : null;
      const seq = Number(frame.seq || data.seq || 0);
      if (conv && seq) bumpSeq(conv, seq);
      const m = findMessage(conv, id);
      if (m) {
        if (frame.type === "message.edited") { m.content = data.content; m.edited = true; } else { m.deleted = true; m.content = ""; }
        if (m.conversation_id === state.current) renderMessages();
      }
      break;
    }
    case "read.updated": {
      const conv = String(frame.conversation_id);
      if (!state.reads.has(conv)) state.reads.set(conv, new Map());
      const reads = state.reads.get(conv);
      const seq = Number(frame.seq);
      if (seq > (reads.get(String(frame.user_id)) || 0)) reads.set(String(frame.user_id), seq);
      if (String(frame.user_id) === String(state.me.id)) { const c = state.conversations.get(conv); if (c) { c.unread = 0; renderConversations(); } }
      if (conv === state.current) renderMessages();
      break;
    }
    case "typing": {
      const conv = String(frame.conversation_id);
      if (String(frame.user_id) === String(state.me.id)) break;
      if (!state.typing.has(conv)) state.typing.set(conv, new Map());
      state.typing.get(conv).set(String(frame.user_id), Date.now() + TYPING_SHOW_MS);
      renderTyping();
      break;
    }
    case "presence":
      state.presence.set(String(frame.user_id), frame.status);
      renderConversations();
      break;
    case "resumed":
      bumpSeq(String(frame.conversation_id), Number(frame.last_seq));
      break;
    case "error":
      notice(frame.message || frame.code, frame.code === "rate_limited" ? "info" : "error");
      break;
    case "auth.lost":
      notice("Your session ended; please log in again.", "error");
      tokensSave(null);
      showAuth();
      break;
    default:
      // Membership changes (added to a group, a new chat) and anything newer than this client: refresh.
      if (frame.conversation_id || (frame.type || "").startsWith("conversation")) loadConversations();
  }
}

// ------------------------------------------------------------------ actions

function sendMessage() {
  const input = $("composer-input");
  const content = input.value;
  if (!content.trim() || !state.current) return;
  const cid = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
  state.pending.set(cid, { conversation_id: state.current, content, createdAt: Date.now() });
  socket.send({ type: "message.send", conversation_id: state.current, client_msg_id: cid, content });
  input.value = "";
  renderMessages({ stickToBottom: true });
}

async function groupAction(kind) {
  const c = state.conversations.get(state.current);
  if (!c) return;
  const gid = c.group_id || c.room_id;
  try {
    if (kind === "rename") {
      const name = prompt("New group name", c.title);
      if (!name) return;
      await api("PATCH", `/api/v1/chats/group/${gid}`, { name });
      c.title = c.name = name;
      $("chat-title").textContent = name;
      renderConversations();
    } else if (kind === "member" || kind === "admin") {
      const username = prompt(kind === "member" ? "Username to add" : "Username to make admin");
      if (!username) return;
      await api("POST", `/api/v1/chats/group/${gid}/${kind === "member" ? "members" : "admins"}`, { username: username.trim() });
      notice(kind === "member" ? `${username} added` : `${username} is now an admin`);
    } else if (kind === "leave") {
      if (!confirm(`Leave ${c.title}?`)) return;
      await api("POST", `/api/v1/chats/group/${gid}/leave`, {});
      state.conversations.delete(c.id);
      state.current = null;
      $("chat-view").classList.remove("in-chat");
      $("chat-title").textContent = "Pick a conversation";
      renderConversations();
      renderMessages();
    }
  } catch (err) { notice(explain(err), "error"); }
}

function wire() {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const tokens = await api("POST", "/api/v1/auth/login", { username: $("login-username").value.trim(), password: $("login-password").value }, { auth: false });
      tokensSave(tokens);
      showChat();
    } catch (err) { notice(explain(err), "error"); }
  });
  $("register-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const username = $("register-username").value.trim();
    const password = $("register-password").value;
    try {
      await api("POST", "/api/v1/auth/register", { username, email: $("register-email").value.trim(), password }, { auth: false });
      tokensSave(await api("POST", "/api/v1/auth/login", { username, password }, { auth: false }));
      showChat();
    } catch (err) { notice(explain(err), "error"); }
  });
  $("logout").addEventListener("click", async () => {
    const tokens = tokensLoad();
    if (socket) socket.close();
    try { if (tokens) await api("POST", "/api/v1/auth/logout", { refresh: tokens.refresh }); } catch { /* logging out anyway */ }
    tokensSave(null);
    location.reload();
  });
  $("new-chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const chat = await api("POST", "/api/v1/chats/single", { username: $("new-chat-username").value.trim() });
      $("new-chat-username").value = "";
      await loadConversations();
      openConversation(String(chat.conversation_id));
    } catch (err) { notice(explain(err), "error"); }
  });
  $("new-group-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const members = $("new-group-members").value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const chat = await api("POST", "/api/v1/chats/group", { name: $("new-group-name").value.trim(), members });
      $("new-group-name").value = ""; $("new-group-members").value = "";
      await loadConversations();
      openConversation(String(chat.conversation_id));
    } catch (err) { notice(explain(err), "error"); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
  $("composer-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendMessage(); return; }
    if (state.current && Date.now() - lastTypingSent > TYPING_SEND_EVERY_MS) {
      lastTypingSent = Date.now();
      socket.send({ type: "typing", conversation_id: state.current });
    }
  });
  $("messages").addEventListener("scroll", async () => {
    const list = $("messages");
    const id = state.current;
    if (!id || list.scrollTop > 40 || state.exhausted.has(id) || list.dataset.loading) return;
    list.dataset.loading = "1";
    const fromBottom = list.scrollHeight - list.scrollTop;
    try {
      await loadPage(id, { before: state.oldestSeq.get(id) });
      renderMessages({ keepOffsetFrom: fromBottom });
    } catch (err) { notice(explain(err), "error"); } finally { delete list.dataset.loading; }
  });
  $("back").addEventListener("click", () => { $("chat-view").classList.remove("in-chat"); state.current = null; renderConversations(); });
  $("group-rename").addEventListener("click", () => groupAction("rename"));
  $("group-add-member").addEventListener("click", () => groupAction("member"));
  $("group-add-admin").addEventListener("click", () => groupAction("admin"));
  $("group-leave").addEventListener("click", () => groupAction("leave"));
}

wire();
if (tokensLoad()) showChat(); else showAuth();
