// Live frames (docs/protocol.md) folded into `state`, then the affected parts redrawn.
import { tokensSave } from "./api.js";
import { state, myId, store, addMessage, bumpSeq, findMessage, normalizeMessage, readMove, TYPING_SHOW_MS } from "./state.js";
import { notice, renderConversations, renderMessages, renderMembers, renderTyping } from "./render.js";
import { loadConversations, loadMembers, loadGroup, loadVersions, scheduleRead, conversationForget } from "./actions.js";
import { reactionApply, quotesRefresh } from "./replies.js";

let onAuthLost = () => {};
export function setAuthLostHandler(fn) { onAuthLost = fn; }

function touchConversation(conversationId, message) {
  const c = state.conversations.get(conversationId);
  if (message) c.last_message = { ...message };
  if (c.title === "…") loadConversations();
  renderConversations();
}

function onMessageNew(frame) {
  const m = normalizeMessage(frame.message);
  const known = store(m.conversation_id).has(m.seq);
  addMessage(m);
  if (m.client_msg_id && m.sender_id === myId()) state.pending.delete(m.client_msg_id);
  if (!state.conversations.has(m.conversation_id)) {
    // A conversation this page has not listed yet (just created by someone else): list it now.
    state.conversations.set(m.conversation_id, { id: m.conversation_id, type: "single", title: "…", unread: 0, members: [] });
  }
  const c = state.conversations.get(m.conversation_id);
  const away = m.conversation_id !== state.current || document.visibilityState !== "visible";
  if (!known && m.sender_id !== myId() && away) c.unread = (c.unread || 0) + 1;
  if (!known && away && m.mentions.includes(myId())) c.mentions = (c.mentions || 0) + 1;
  // A sender has read their own message.
  readMove(m.conversation_id, m.sender_id, m.seq);
  touchConversation(m.conversation_id, m);
  if (m.conversation_id === state.current) { renderMessages(); scheduleRead(); }
}

function onMessageChanged(frame) {
  const data = frame.message;
  const conv = String(frame.conversation_id);
  if (frame.seq) bumpSeq(conv, Number(frame.seq));
  const m = findMessage(conv, String(data.id));
  if (!m) return;
  if (frame.type === "message.edited") {
    m.content = data.content; m.edited = true;
    if (Array.isArray(data.mentions)) m.mentions = data.mentions.map(String); // re-resolved by the edit
  } else { m.deleted = true; m.content = ""; }
  quotesRefresh(conv, m.id, { content: m.content, deleted: m.deleted });
  if (frame.type === "message.edited" && state.versionsOpen.has(m.id)) loadVersions(m);
  if (m.deleted) { state.versionsOpen.delete(m.id); state.versions.delete(m.id); }
  if (state.editing === m.id && m.deleted) state.editing = null;
  if (m.conversation_id === state.current) renderMessages();
}

export function handleEvent(frame) {
  switch (frame.type) {
    case "ready":
      // Un-acked sends from before the drop go again; the server deduplicates by client_msg_id.
      for (const [cid, p] of state.pending) {
        state.socket.send({ type: "message.send", conversation_id: p.conversation_id, client_msg_id: cid, content: p.content, ...(p.reply_to ? { reply_to: p.reply_to } : {}) });
      }
      loadConversations();
      if (state.current) loadMembers(state.current);
      break;
    case "message.new": onMessageNew(frame); break;
    case "ack":
      if (frame.client_msg_id) state.pending.delete(frame.client_msg_id);
      if (frame.seq) bumpSeq(String(frame.conversation_id), Number(frame.seq));
      if (String(frame.conversation_id) === state.current) renderMessages();
      break;
    case "message.edited":
    case "message.deleted": onMessageChanged(frame); break;
    case "reaction.added":
    case "reaction.removed": {
      const conv = String(frame.conversation_id);
      if (frame.seq) bumpSeq(conv, Number(frame.seq));
      reactionApply(frame);
      if (conv === state.current) renderMessages();
      break;
    }
    case "read.updated": {
      const conv = String(frame.conversation_id);
      readMove(conv, String(frame.user_id), Number(frame.seq));
      if (String(frame.user_id) === myId()) { const c = state.conversations.get(conv); if (c) { c.unread = 0; c.unreadCapped = false; c.mentions = 0; renderConversations(); } }
      if (conv === state.current) renderMessages();
      break;
    }
    case "typing": {
      const conv = String(frame.conversation_id);
      if (String(frame.user_id) === myId()) break;
      if (!state.typing.has(conv)) state.typing.set(conv, new Map());
      state.typing.get(conv).set(String(frame.user_id), Date.now() + TYPING_SHOW_MS);
      renderTyping();
      break;
    }
    case "presence":
      state.presence.set(String(frame.user_id), frame.status);
      renderConversations();
      if (state.current) renderMembers();
      break;
    case "membership": {
      const conv = String(frame.conversation_id);
      if (frame.status === "left") {
        const c = state.conversations.get(conv);
        if (c && conv === state.current) notice(`You are no longer in ${c.title}.`);
        conversationForget(conv);
      } else {
        loadConversations();
      }
      if (frame.status !== "left" && state.current === conv) { loadMembers(conv); loadGroup(conv); }
      break;
    }
    case "resumed":
      bumpSeq(String(frame.conversation_id), Number(frame.last_seq));
      break;
    case "error":
      notice(frame.message || frame.code, frame.code === "rate_limited" ? "info" : "error");
      break;
    case "auth.lost":
      notice("Your session ended; please log in again.", "error");
      tokensSave(null);
      onAuthLost();
      break;
    default:
      // Membership changes (added to a group, a new chat) and anything newer than this client: refresh.
      if (frame.conversation_id || (frame.type || "").startsWith("conversation")) {
        loadConversations();
        if (state.current && String(frame.conversation_id) === state.current) loadMembers(state.current);
      }
  }
}
