// Drawing: each function rebuilds one part of the page from `state`. All text goes in with textContent
// (never innerHTML). Clicks call into actions.js.
import { ApiError } from "./api.js";
import { $, state, myId, store, readersOf, senderName, otherMemberId, groupOf, iAmAdmin } from "./state.js";
import { openConversation, editStart, editCancel, editSave, messageDelete, versionsToggle, adminRemove, loadPage } from "./actions.js";
import { mentionsMark, readersDetails } from "./finders.js";
import { repliesWire, quoteBlock, reactionsBar, replyStart, replyBannerRender } from "./replies.js";

export function notice(text, kind = "info") {
  const el = document.createElement("div");
  el.className = `notice ${kind}`;
  el.textContent = text;
  $("notices").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 6000 : 3500);
}

export function explain(err) {
  if (err instanceof ApiError) return err.status === 429 ? `Slow down: ${err.message}` : err.message;
  return "Network problem; please try again.";
}

export function setConnection(s) {
  const el = $("connection");
  el.dataset.state = s;
  el.textContent = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", offline: "offline" }[s] || s;
}

function sortedConversations() {
  const when = (c) => (c.last_message && c.last_message.timestamp) || c.updated_at || "";
  return [...state.conversations.values()].sort((a, b) => (when(b) > when(a) ? 1 : when(b) < when(a) ? -1 : 0));
}

export function renderConversations() {
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
    const unread = c.unread > 0 ? `${c.unread}${c.unreadCapped ? "+" : ""}` : "";
    if (unread) { badge.className = "badge"; badge.textContent = unread; }
    const atBadge = document.createElement("span");
    if (c.mentions > 0) { atBadge.className = "badge mention-badge"; atBadge.textContent = `@${c.mentions > 99 ? "99+" : c.mentions}`; }
    const last = document.createElement("span");
    last.className = "conv-last";
    const lm = c.last_message;
    last.textContent = lm ? (lm.deleted ? "message deleted" : lm.content || "") : "no messages yet";
    b.append(dot, name, atBadge, badge, last);
    const extra = [online ? "online" : null, unread ? `${unread} unread` : null,
      c.mentions ? `${c.mentions} mention${c.mentions > 1 ? "s" : ""} of you` : null].filter(Boolean).join(", ");
    b.setAttribute("aria-label", `${c.title}${extra ? ", " + extra : ""}`);
    b.addEventListener("click", () => openConversation(c.id));
    li.append(b);
    list.append(li);
  }
  if (focusedId) { const again = list.querySelector(`[data-conversation="${CSS.escape(focusedId)}"]`); if (again) again.focus(); }
}

// Admin-only group tools: "Delete group" is shown to the group's admins only (the server checks again).
export function renderGroupTools() {
  const del = $("group-delete");
  if (del) del.hidden = !iAmAdmin(state.current);
}

export function renderMembers() {
  const list = $("member-list");
  const focused = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.adminOf;
  list.replaceChildren();
  const ids = state.members.get(state.current) || [];
  const group = groupOf(state.current);
  const amAdmin = iAmAdmin(state.current);
  $("members-count").textContent = ids.length ? `Members (${ids.length})` : "Members";
  for (const id of ids) {
    const li = document.createElement("li");
    const online = state.presence.get(id) === "online";
    const dot = document.createElement("span");
    dot.className = `dot${online ? " online" : ""}`;
    dot.setAttribute("aria-hidden", "true");
    const name = document.createElement("span");
    name.textContent = id === myId() ? `${state.names.get(id) || "you"} (you)` : state.names.get(id) || id;
    li.append(dot, name);
    const isAdmin = Boolean(group && group.admins.includes(id));
    const adder = group && group.added_by[id];
    const about = [online ? "online" : "offline", isAdmin ? "admin" : null,
      adder ? `added by ${adder === myId() ? "you" : state.names.get(adder) || "a former member"}` : null].filter(Boolean);
    if (isAdmin || adder) {
      const tag = document.createElement("span");
      tag.className = "member-about";
      tag.textContent = about.slice(1).join(", ");
      li.append(" ", tag);
    }
    const label = `${name.textContent}, ${about.join(", ")}`;
    if (amAdmin && isAdmin) {
      const b = button("Remove admin", `Remove admin rights of ${name.textContent}`, () => adminRemove(id));
      b.dataset.adminOf = id;
      li.append(" ", b);
    }
    li.setAttribute("aria-label", label);
    list.append(li);
  }
  if (focused) { const again = list.querySelector(`[data-admin-of="${CSS.escape(focused)}"]`); if (again) again.focus(); }
  renderGroupTools();
}

// The receipt under my newest message that someone read: "seen" in a 1:1 chat, "read by N of M" in a group
// (M: the other members).
function receiptOf(m) {
  const readers = readersOf(m);
  if (!readers.length) return null;
  const c = state.conversations.get(m.conversation_id);
  if (!c || c.type === "single") return { text: "seen", title: "seen" };
  const others = (state.members.get(m.conversation_id) || c.members || []).filter((u) => u !== myId()).length;
  const names = readers.map((u) => state.names.get(u) || "member").join(", ");
  return { text: `read by ${readers.length} of ${Math.max(others, readers.length)}`, title: `read by ${names}`,
    readers: readers.map((u) => state.names.get(u) || "member") };
}

export function renderMessages({ stickToBottom = false, keepOffsetFrom = null } = {}) {
  const list = $("messages");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const editingFocus = document.activeElement && document.activeElement.classList.contains("edit-input");
  // A live frame (a read receipt, presence, a new message) redraws the list while a message is being edited: the
  // draft, its caret and its focus must survive the redraw, or Enter would save the text as it was before.
  const draftInput = list.querySelector(".edit-input");
  const draft = draftInput ? { id: draftInput.dataset.id, value: draftInput.value, start: draftInput.selectionStart,
    end: draftInput.selectionEnd } : null;
  // A message focused by a jump to it (replies.js) keeps the focus across redraws (a live frame redraws the list).
  const focusedSeq = document.activeElement && document.activeElement.matches("li.msg") ? document.activeElement.dataset.seq : null;
  list.replaceChildren();
  if (!state.current) return;
  const msgs = [...store(state.current).values()].sort((a, b) => a.seq - b.seq);
  const pendings = [...state.pending.entries()].filter(([, p]) => p.conversation_id === state.current);
  const mineIds = new Set(msgs.map((m) => m.client_msg_id).filter(Boolean));
  let lastMineRead = null;
  for (const m of msgs) if (m.sender_id === myId() && !m.deleted && readersOf(m).length) lastMineRead = m.seq;
  for (const m of msgs) list.append(messageItem(m, { receipt: m.seq === lastMineRead ? receiptOf(m) : null }));
  for (const [cid, p] of pendings) {
    if (mineIds.has(cid)) continue;
    list.append(messageItem({ id: cid, seq: 0, sender_id: myId(), content: p.content, pending: true }, {}));
  }
  replyBannerRender();
  if (focusedSeq) {
    const again = list.querySelector(`li.msg[data-seq="${CSS.escape(focusedSeq)}"]`);
    if (again) { again.tabIndex = -1; again.focus({ preventScroll: true }); }
  }
  const input = list.querySelector(".edit-input");
  if (input && draft && input.dataset.id === draft.id) { input.value = draft.value; input.setSelectionRange(draft.start, draft.end); }
  if (input && editingFocus) input.focus();
  if (keepOffsetFrom !== null) list.scrollTop = list.scrollHeight - keepOffsetFrom;
  else if (stickToBottom || nearBottom) list.scrollTop = list.scrollHeight;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = text; b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function editForm(m) {
  const form = document.createElement("form");
  form.className = "edit-form";
  const input = document.createElement("textarea");
  input.className = "edit-input";
  input.dataset.id = m.id;
  input.value = m.content;
  input.rows = 2;
  input.setAttribute("aria-label", "Edit message (Enter saves, Escape cancels)");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { e.preventDefault(); editCancel(); }
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); editSave(m, input.value); }
  });
  const save = document.createElement("button");
  save.type = "submit"; save.textContent = "Save";
  form.addEventListener("submit", (e) => { e.preventDefault(); editSave(m, input.value); });
  form.append(input, save, button("Cancel", "Cancel editing", editCancel));
  return form;
}

// The versions of an edited message, oldest first (the last is what it says now).
function versionsList(m) {
  const ol = document.createElement("ol");
  ol.className = "versions";
  ol.setAttribute("aria-label", "Edit history");
  const versions = state.versions.get(m.id);
  if (!versions) {
    const li = document.createElement("li");
    li.textContent = "loading…";
    ol.append(li);
    return ol;
  }
  versions.forEach((v, i) => {
    const li = document.createElement("li");
    const when = document.createElement("time");
    if (v.at) { when.dateTime = v.at; when.textContent = new Date(v.at).toLocaleString([], { dateStyle: "short", timeStyle: "short" }); }
    const what = document.createElement("span");
    what.className = "version-label";
    what.textContent = i === 0 ? "original" : i === versions.length - 1 ? "current" : `edit ${i}`;
    const text = document.createElement("span");
    text.className = "version-content";
    text.textContent = v.content;
    li.append(what, " · ", when, ": ", text);
    ol.append(li);
  });
  return ol;
}

function messageItem(m, { receipt }) {
  const li = document.createElement("li");
  const mine = m.sender_id === myId();
  li.className = `msg${mine ? " mine" : ""}${m.pending ? " pending" : ""}${m.deleted ? " deleted" : ""}`;
  li.dataset.seq = String(m.seq);
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  who.className = "sender";
  who.textContent = senderName(m);
  const when = document.createElement("time");
  if (m.timestamp) { when.dateTime = m.timestamp; when.textContent = new Date(m.timestamp).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }
  meta.append(who, when);
  if (m.edited && !m.deleted && !m.pending) {
    const open = state.versionsOpen.has(m.id);
    const e = button("edited", open ? "Hide edit history" : "Show edit history", () => versionsToggle(m));
    e.className = "edited-toggle";
    e.dataset.versionsOf = m.id;
    e.setAttribute("aria-expanded", String(open));
    meta.append(e);
  }
  if (m.pending) { const e = document.createElement("span"); e.textContent = "sending…"; meta.append(e); }
  if (receipt && receipt.readers) meta.append(readersDetails(m, receipt));
  else if (receipt) { const e = document.createElement("span"); e.className = "seen"; e.textContent = receipt.text; e.title = receipt.title; meta.append(e); }
  li.append(meta);
  if (state.editing === m.id && !m.deleted) { li.append(editForm(m)); return li; }
  if (m.reply_to) li.append(quoteBlock(m, loadPage));
  const body = document.createElement("div");
  body.className = "body";
  if (m.deleted) body.textContent = "message deleted";
  else mentionsMark(body, m);
  li.append(body);
  if (state.versionsOpen.has(m.id) && !m.deleted) li.append(versionsList(m));
  if (!m.pending && !m.deleted) li.append(reactionsBar(m));
  if (!m.pending && !m.deleted) {
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(button("reply", `Reply to ${senderName(m)}`, () => replyStart(m)));
    if (mine) {
      actions.append(document.createTextNode(" "), button("edit", "Edit message", () => editStart(m)), document.createTextNode(" "),
        button("delete", "Delete message", () => { if (confirm("Delete this message?")) messageDelete(m); }));
    }
    li.append(actions);
  }
  return li;
}

export function renderTyping() {
  const el = $("typing");
  const now = Date.now();
  const typers = state.typing.get(state.current);
  const names = typers ? [...typers.entries()].filter(([, t]) => t > now).map(([u]) => state.names.get(u) || "someone") : [];
  el.textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

repliesWire({ render: () => renderMessages(), notice });
