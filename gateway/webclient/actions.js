// What the user does, and the server calls behind it. Each action updates `state`, then asks render.js to
// redraw what changed.
import { api, listOf } from "./api.js";
import {
  $, state, myId, store, addMessage, normalizeConversation, normalizeMembers, normalizeMessage, normalizeGroup,
  normalizeVersions, PAGE_SIZE, READ_DEBOUNCE_MS, TYPING_SEND_EVERY_MS, readsOf, newClientMsgId,
} from "./state.js";
import { notice, explain, renderConversations, renderMessages, renderMembers, renderGroupTools } from "./render.js";

let readTimer = null;
let lastTypingSent = 0;

export async function loadConversations() {
  try {
    const data = await api("GET", "/api/v1/conversations");
    for (const raw of listOf(data)) normalizeConversation(raw);
    renderConversations();
  } catch (err) { notice(explain(err), "error"); }
}

// Names, presence and read cursors of the open conversation's members: what a reload would otherwise lose
// until the next live frame.
export async function loadMembers(conversationId) {
  try {
    const data = await api("GET", `/api/v1/conversations/${conversationId}/members`);
    normalizeMembers(conversationId, listOf(data));
    if (conversationId === state.current) { renderMembers(); renderMessages(); }
    renderConversations();
  } catch (err) { notice(explain(err), "error"); }
}

// The open group's admins and who added whom (GET /chats/group/{id}): what the admin tools depend on.
export async function loadGroup(conversationId) {
  const c = state.conversations.get(conversationId);
  if (!c || c.type !== "group") return;
  try {
    normalizeGroup(await api("GET", `/api/v1/chats/group/${c.group_id || c.room_id}`));
    if (conversationId === state.current) { renderMembers(); renderGroupTools(); }
  } catch (err) { notice(explain(err), "error"); }
}

// Edit history: the "edited" label opens the message's versions (GET /messages/{id}/versions) below it.
export async function loadVersions(m) {
  try {
    const data = await api("GET", `/api/v1/messages/${m.id}/versions`);
    normalizeVersions(m.id, data.results || []);
  } catch (err) {
    state.versionsOpen.delete(m.id);
    notice(explain(err), "error");
  }
  if (m.conversation_id === state.current) renderMessages();
}

export function versionsToggle(m) {
  if (state.versionsOpen.has(m.id)) {
    state.versionsOpen.delete(m.id);
    renderMessages();
  } else {
    state.versionsOpen.add(m.id);
    renderMessages();
    loadVersions(m);
  }
  const again = $("messages").querySelector(`[data-versions-of="${CSS.escape(m.id)}"]`);
  if (again) again.focus();
}

export async function adminRemove(userId) {
  const c = state.conversations.get(state.current);
  if (!c) return;
  const name = state.names.get(userId) || "this member";
  if (!confirm(`Remove admin rights of ${userId === myId() ? "yourself" : name}?`)) return;
  try {
    await api("DELETE", `/api/v1/chats/group/${c.group_id || c.room_id}/admins/${userId}`);
    notice(`${userId === myId() ? "You are" : name + " is"} no longer an admin`);
  } catch (err) { notice(explain(err), "error"); }
  await loadGroup(c.id);
}

// The conversation is gone for me (I left, was removed, or the group was deleted): forget it.
export function conversationForget(conversationId) {
  const c = state.conversations.get(conversationId);
  state.conversations.delete(conversationId);
  state.messages.delete(conversationId);
  state.lastSeq.delete(conversationId);
  if (c && c.type === "group") state.groups.delete(String(c.group_id || c.room_id));
  if (state.current === conversationId) {
    closeConversation();
    $("chat-title").textContent = "Pick a conversation";
    renderMessages();
  } else renderConversations();
}

export async function loadPage(conversationId, { before } = {}) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (before) params.set("before_seq", String(before));
  const data = await api("GET", `/api/v1/conversations/${conversationId}/messages?${params}`);
  const page = listOf(data).map(normalizeMessage);
  for (const m of page) addMessage(m);
  if (page.length < PAGE_SIZE) state.exhausted.add(conversationId);
  return page.length;
}

export async function openConversation(id) {
  state.current = id;
  state.editing = null;
  $("chat-view").classList.add("in-chat");
  const c = state.conversations.get(id);
  $("chat-title").textContent = c ? c.title : "Conversation";
  $("group-tools").hidden = !(c && c.type === "group");
  renderGroupTools();
  $("members-panel").hidden = false;
  $("composer-input").disabled = false;
  $("send").disabled = false;
  renderConversations();
  renderMembers();
  const members = loadMembers(id);
  const group = loadGroup(id);
  try {
    if (!state.messages.has(id) || store(id).size === 0) await loadPage(id);
  } catch (err) { notice(explain(err), "error"); }
  renderMessages({ stickToBottom: true });
  scheduleRead();
  $("composer-input").focus();
  await Promise.all([members, group]);
}

export function closeConversation() {
  $("chat-view").classList.remove("in-chat");
  state.current = null;
  state.editing = null;
  $("members-panel").hidden = true;
  renderConversations();
}

export function scheduleRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const id = state.current;
    if (!id || document.visibilityState !== "visible") return;
    const seq = state.lastSeq.get(id) || 0;
    const mine = readsOf(id).get(myId()) || 0;
    const c = state.conversations.get(id);
    if (c && c.unread) { c.unread = 0; c.unreadCapped = false; renderConversations(); }
    if (seq > mine && state.socket) state.socket.send({ type: "read", conversation_id: id, seq });
  }, READ_DEBOUNCE_MS);
}

export function messageSend() {
  const input = $("composer-input");
  const content = input.value;
  if (!content.trim() || !state.current) return;
  const cid = newClientMsgId();
  const reply = state.replyTo && state.replyTo.conversation_id === state.current ? state.replyTo.id : null;
  state.pending.set(cid, { conversation_id: state.current, content, createdAt: Date.now(), reply_to: reply });
  state.socket.send({ type: "message.send", conversation_id: state.current, client_msg_id: cid, content, ...(reply ? { reply_to: reply } : {}) });
  state.replyTo = null;
  input.value = "";
  renderMessages({ stickToBottom: true });
}

export function typingSignal() {
  if (state.current && state.socket && Date.now() - lastTypingSent > TYPING_SEND_EVERY_MS) {
    lastTypingSent = Date.now();
    state.socket.send({ type: "typing", conversation_id: state.current });
  }
}

// Editing happens in place: the message's body becomes a text box (Enter saves, Escape cancels).
export function editStart(m) {
  state.editing = m.id;
  renderMessages();
  const input = $("messages").querySelector(".edit-input");
  if (input) { input.focus(); input.setSelectionRange(input.value.length, input.value.length); }
}

export function editCancel() {
  const id = state.editing;
  state.editing = null;
  renderMessages();
  const again = id && [...$("messages").querySelectorAll(".msg.mine button")].find((b) => b.textContent === "edit");
  if (again) again.focus(); else $("composer-input").focus();
}

export function editSave(m, content) {
  if (!content.trim()) { notice("A message cannot be empty; delete it instead.", "error"); return; }
  if (content !== m.content && !state.socket.send({ type: "message.edit", message_id: m.id, content })) {
    notice("Not connected; your edit was not sent.", "error");
    return;
  }
  state.editing = null;
  renderMessages();
  $("composer-input").focus();
}

export function messageDelete(m) {
  if (!state.socket.send({ type: "message.delete", message_id: m.id })) notice("Not connected; try again.", "error");
}

export async function groupAction(kind) {
  const c = state.conversations.get(state.current);
  if (!c) return;
  const gid = c.group_id || c.room_id;
  try {
    if (kind === "rename") {
      const name = prompt("New group name", c.title);
      if (!name) return;
      await api("PATCH", `/api/v1/chats/group/${gid}`, { name });
      c.title = name;
      $("chat-title").textContent = name;
      renderConversations();
    } else if (kind === "member" || kind === "admin") {
      const username = prompt(kind === "member" ? "Username to add" : "Username to make admin");
      if (!username) return;
      await api("POST", `/api/v1/chats/group/${gid}/${kind === "member" ? "members" : "admins"}`, { username: username.trim() });
      notice(kind === "member" ? `${username} added` : `${username} is now an admin`);
      loadMembers(c.id);
      loadGroup(c.id);
    } else if (kind === "leave") {
      if (!confirm(`Leave ${c.title}?`)) return;
      await api("POST", `/api/v1/chats/group/${gid}/leave`, {});
      conversationForget(c.id);
    } else if (kind === "delete") {
      if (!confirm(`Delete ${c.title} for every member? This cannot be undone.`)) return;
      await api("DELETE", `/api/v1/chats/group/${gid}`);
      notice(`${c.title} deleted`);
      conversationForget(c.id);
    }
  } catch (err) { notice(explain(err), "error"); }
}
