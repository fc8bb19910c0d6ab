// Client state and the rules that fold server data into it. No DOM here: render.js draws, events.js applies
// live frames, actions.js talks to the server. Field names are the API's (docs/api.md, the OpenAPI schema):
// tests/web/test_webclient_schema.py checks every `raw.<field>` read below against the schema.

export const PAGE_SIZE = 30;
export const TYPING_SHOW_MS = 4000;      // how long "x is typing" stays after the last typing frame
export const TYPING_SEND_EVERY_MS = 2500; // at most one typing frame per this interval while typing
export const READ_DEBOUNCE_MS = 400;

export const state = {
  me: null,
  socket: null,
  conversations: new Map(), // id -> ConversationOut fields, plus title
  current: null,
  messages: new Map(),      // conversation id -> Map(seq -> message)
  lastSeq: new Map(),       // conversation id -> highest event seq seen (for resume)
  oldestSeq: new Map(),     // conversation id -> lowest loaded seq (for paging up)
  exhausted: new Set(),     // conversations whose oldest page was loaded
  pending: new Map(),       // client_msg_id -> {conversation_id, content, createdAt}
  reads: new Map(),         // conversation id -> Map(user id -> read seq)
  members: new Map(),       // conversation id -> [user id] (from GET /conversations/{id}/members)
  presence: new Map(),      // user id -> "online" | "offline"
  typing: new Map(),        // conversation id -> Map(user id -> until)
  names: new Map(),         // user id -> username
  editing: null,            // id of the message being edited in place
  groups: new Map(),        // group id -> {id, admins: [user id], added_by: {member -> adder | null}}
  versions: new Map(),      // message id -> [{seq, content, at}] (GET /messages/{id}/versions), oldest first
  versionsOpen: new Set(),  // message ids whose edit history is shown
  replyTo: null,            // {id, conversation_id, name, excerpt} of the message being answered (replies.js)
  pickerFor: null,          // id of the message whose emoji picker is open
};

export const $ = (id) => document.getElementById(id);
export const myId = () => String(state.me.id);

export function readsOf(conversationId) {
  if (!state.reads.has(conversationId)) state.reads.set(conversationId, new Map());
  return state.reads.get(conversationId);
}

export function readMove(conversationId, userId, seq) {
  const reads = readsOf(conversationId);
  if (seq > (reads.get(userId) || 0)) reads.set(userId, seq);
}

// ConversationOut -> state. `peer` is the other member of a 1:1 chat ({id, username, status}); `read_seq`
// is the caller's own cursor; `members` are user ids.
export function normalizeConversation(raw) {
  const id = String(raw.id);
  const prev = state.conversations.get(id) || {};
  const c = {
    ...prev, id, type: raw.type, title: raw.title, members: (raw.members || []).map(String),
    peer: raw.peer || null, group_id: raw.group_id, room_id: raw.room_id, last_message: raw.last_message,
    last_seq: Number(raw.last_seq || 0), updated_at: raw.updated_at,
  };
  if (!c.title) c.title = c.peer ? c.peer.username : c.type === "group" ? "group" : "chat";
  // The server's count may trail live messages not persisted yet, so keep the larger count.
  c.unread = Math.max(Number(raw.unread ?? 0), Number(prev.unread ?? 0));
  // A lower bound (a reader far behind on the default store): shown as "N+" until read.
  c.unreadCapped = Boolean(raw.unread_capped) || Boolean(prev.unreadCapped && prev.unread);
  // Messages naming me above my read cursor (the server's count resets when I read past them).
  c.mentions = Math.max(Number(raw.mentions ?? 0), Number(prev.mentions ?? 0));
  if (id === state.current && document.visibilityState === "visible") { c.unread = 0; c.unreadCapped = false; c.mentions = 0; }
  if (state.me) readMove(id, myId(), Number(raw.read_seq || 0));
  if (c.peer && c.peer.id) {
    state.names.set(String(c.peer.id), c.peer.username);
    // A live presence frame is newer than a list fetched before it: only fill what is unknown.
    if (!state.presence.has(String(c.peer.id))) state.presence.set(String(c.peer.id), c.peer.status === "online" ? "online" : "offline");
  }
  state.conversations.set(id, c);
  if (!state.lastSeq.has(id)) state.lastSeq.set(id, c.last_seq);
  return c;
}

// MemberOut -> state: names, presence and read cursors of a conversation's members.
export function normalizeMembers(conversationId, rows) {
  const ids = [];
  for (const raw of rows) {
    const id = String(raw.id);
    ids.push(id);
    state.names.set(id, raw.username);
    state.presence.set(id, raw.online ? "online" : "offline");
    readMove(conversationId, id, Number(raw.read_seq || 0));
  }
  state.members.set(conversationId, ids);
  return ids;
}

// GroupOut -> state: who administers the group and who added whom.
export function normalizeGroup(raw) {
  const g = { id: String(raw.group_id), admins: (raw.admins || []).map(String), added_by: raw.added_by || {} };
  state.groups.set(g.id, g);
  return g;
}

// MessageVersionOut rows -> state, oldest first.
export function normalizeVersions(messageId, rows) {
  const versions = rows.map((raw) => ({ seq: Number(raw.seq), content: raw.content ?? "", at: raw.at }));
  state.versions.set(messageId, versions);
  return versions;
}

export function groupOf(conversationId) {
  const c = state.conversations.get(conversationId);
  return c && c.type === "group" ? state.groups.get(String(c.group_id || c.room_id)) || null : null;
}

export function iAmAdmin(conversationId) {
  const g = groupOf(conversationId);
  return Boolean(g && g.admins.includes(myId()));
}

// MessageOut (history) or a live frame's message -> state.
export function normalizeMessage(raw) {
  return {
    id: String(raw.id),
    conversation_id: String(raw.conversation_id),
    seq: Number(raw.seq),
    sender_id: String(raw.sender_id),
    content: raw.content ?? "",
    timestamp: raw.timestamp,
    deleted: Boolean(raw.deleted),
    edited: Boolean(raw.edited_at),
    client_msg_id: raw.client_msg_id,
    mentions: (raw.mentions || []).map(String),  // ids of the members its @usernames named
    reply_to: raw.reply_to || null,
    reactions: (raw.reactions || []).map((r) => ({ emoji: r.emoji, user_ids: (r.user_ids || []).map(String) })),
  };
}

export function store(conversationId) {
  if (!state.messages.has(conversationId)) state.messages.set(conversationId, new Map());
  return state.messages.get(conversationId);
}

export function bumpSeq(conversationId, seq) {
  if (seq > (state.lastSeq.get(conversationId) || 0)) state.lastSeq.set(conversationId, seq);
}

export function addMessage(m) {
  const msgs = store(m.conversation_id);
  for (const [seq, existing] of msgs) if (existing.id === m.id && seq !== m.seq) msgs.delete(seq);
  msgs.set(m.seq, { ...(msgs.get(m.seq) || {}), ...m });
  const oldest = state.oldestSeq.get(m.conversation_id);
  if (oldest === undefined || m.seq < oldest) state.oldestSeq.set(m.conversation_id, m.seq);
  bumpSeq(m.conversation_id, m.seq);
}

export function findMessage(conversationId, messageId) {
  const maps = conversationId ? [store(conversationId)] : [...state.messages.values()];
  for (const map of maps) for (const m of map.values()) if (m.id === messageId) return m;
  return null;
}

// The other members who have read message `m` (their cursor is at or past its seq).
export function readersOf(m) {
  const reads = state.reads.get(m.conversation_id);
  if (!reads) return [];
  return [...reads].filter(([user, seq]) => user !== myId() && user !== m.sender_id && seq >= m.seq).map(([u]) => u);
}

export function senderName(m) {
  if (m.sender_id === myId()) return "you";
  const known = state.names.get(m.sender_id);
  if (known) return known;
  const c = state.conversations.get(m.conversation_id);
  return c && c.type === "single" ? c.title : "member";
}

export function otherMemberId(c) {
  if (c.type !== "single") return null;
  if (c.peer && c.peer.id) return String(c.peer.id);
  return (c.members || []).find((m) => m !== myId()) || null;
}

export function resumeState() {
  const out = {};
  for (const [id, seq] of state.lastSeq) if (seq > 0) out[id] = seq;
  return out;
}

export function newClientMsgId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}
