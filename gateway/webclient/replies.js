// Replies and reactions in the page (docs/protocol.md, "Replies and reactions"): the quote above a reply (a
// button that jumps to the original), the reply banner over the composer, the reaction buttons under a
// message (toggle buttons with aria-pressed) and the emoji picker. Every control is a real <button>, so it
// is reached with Tab and announced by screen readers with its label.
import { api } from "./api.js";
import { $, state, myId, store } from "./state.js";

// The reaction set the server accepts (GET /api/v1/reactions, CHATSTREAM_REACTION_EMOJI); anything else is
// refused. The default set until reactionSetLoad() has read the server's.
export const REACTION_EMOJI = ["👍", "👎", "❤️", "😂", "😮", "😢", "🎉", "🙏", "🔥", "👀", "✅", "🚀"];

export async function reactionSetLoad() {
  try {
    const set = await api("GET", "/api/v1/reactions");
    if (Array.isArray(set.emoji) && set.emoji.length) REACTION_EMOJI.splice(0, REACTION_EMOJI.length, ...set.emoji.map(String));
  } catch { /* keep the default set: a refused emoji still gets its error */ }
}
const EMOJI_NAMES = {
  "👍": "thumbs up", "👎": "thumbs down", "❤️": "heart", "😂": "laughing", "😮": "surprised", "😢": "sad",
  "🎉": "party", "🙏": "thanks", "🔥": "fire", "👀": "eyes", "✅": "check", "🚀": "rocket",
};
export const emojiName = (e) => EMOJI_NAMES[e] || e;

let redraw = () => {};
let flash = () => {};
// render.js hands in its redraw and notice functions (this module draws parts of its message items).
export function repliesWire({ render, notice }) { redraw = render; flash = notice; }

const nameOf = (id, fallback) => (id === myId() ? "you" : state.names.get(id) || fallback || "someone");

// ------------------------------------------------------------------ state updates from live frames

// reaction.added / reaction.removed: the frame carries every user with that emoji now.
export function reactionApply(frame) {
  const r = frame.reaction || {};
  const msgs = store(String(frame.conversation_id));
  for (const m of msgs.values()) {
    if (m.id !== String(r.id)) continue;
    const list = (m.reactions || []).filter((x) => x.emoji !== r.emoji);
    const users = (r.user_ids || []).map(String);
    if (users.length) list.push({ emoji: r.emoji, user_ids: users });
    m.reactions = REACTION_EMOJI.filter((e) => list.some((x) => x.emoji === e)).map((e) => list.find((x) => x.emoji === e));
  }
}

// An edit or delete of a message: the quotes of it in loaded replies show the change.
export function quotesRefresh(conversationId, messageId, { content, deleted }) {
  for (const m of store(conversationId).values()) {
    if (!m.reply_to || m.reply_to.id !== messageId) continue;
    m.reply_to = { ...m.reply_to, deleted: Boolean(deleted), excerpt: deleted ? "" : String(content || "").slice(0, 100) };
  }
}

// ------------------------------------------------------------------ replying

export function replyStart(m) {
  state.replyTo = { id: m.id, conversation_id: m.conversation_id, name: nameOf(m.sender_id), excerpt: (m.content || "").slice(0, 100) };
  replyBannerRender();
  $("composer-input").focus();
}

export function replyCancel() {
  state.replyTo = null;
  replyBannerRender();
  $("composer-input").focus();
}

// The banner over the composer while a reply is being written ("Replying to bob: …" and a cancel button).
export function replyBannerRender() {
  const el = $("reply-banner");
  if (!el) return;
  const r = state.replyTo && state.replyTo.conversation_id === state.current ? state.replyTo : null;
  el.replaceChildren();
  el.hidden = !r;
  if (!r) return;
  const text = document.createElement("span");
  text.textContent = `Replying to ${r.name}: ${r.excerpt}`;
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "×";
  cancel.setAttribute("aria-label", "Cancel reply");
  cancel.addEventListener("click", replyCancel);
  el.append(text, " ", cancel);
}

// ------------------------------------------------------------------ the quote, and jumping to the original

function messageElement(seq) {
  return $("messages").querySelector(`li.msg[data-seq="${CSS.escape(String(seq))}"]`);
}

// Scroll to the original and focus it (loading older pages first if it is not loaded yet; bounded).
export async function jumpTo(quote, loadOlder) {
  const conv = state.current;
  for (let pages = 0; pages < 20 && ![...store(conv).values()].some((m) => m.id === quote.id); pages++) {
    const before = state.oldestSeq.get(conv);
    if (state.exhausted.has(conv) || !before || before <= quote.seq) break;
    try { await loadOlder(conv, { before }); } catch { break; }
  }
  redraw();
  const el = messageElement(quote.seq);
  if (!el) { flash("The original message is not available.", "error"); return; }
  el.tabIndex = -1;
  el.scrollIntoView({ block: "center" });
  el.classList.add("flash");
  setTimeout(() => el.classList.remove("flash"), 1500);
  el.focus();
}

export function quoteBlock(m, loadOlder) {
  const q = m.reply_to;
  const b = document.createElement("button");
  b.type = "button";
  b.className = "quote";
  const who = nameOf(String(q.sender_id), q.username);
  const what = q.deleted ? "message deleted" : q.excerpt;
  b.textContent = `↪ ${who}: ${what}`;
  b.setAttribute("aria-label", `In reply to ${who}: ${what}. Go to the original message`);
  b.addEventListener("click", () => jumpTo(q, loadOlder));
  return b;
}

// ------------------------------------------------------------------ reactions

export async function reactionToggle(m, emoji) {
  const mine = (m.reactions || []).some((r) => r.emoji === emoji && r.user_ids.includes(myId()));
  const frame = { type: mine ? "reaction.remove" : "reaction.add", message_id: m.id, emoji };
  // The socket when it is up (the live frame updates everyone, us included); REST otherwise.
  if (state.socket && state.socket.send(frame)) return;
  try {
    const out = mine ? await api("DELETE", `/api/v1/messages/${m.id}/reactions/${encodeURIComponent(emoji)}`)
      : await api("POST", `/api/v1/messages/${m.id}/reactions`, { emoji });
    reactionApply({ conversation_id: m.conversation_id, reaction: { id: m.id, emoji, user_ids: out.user_ids } });
    redraw();
  } catch (err) { flash(err.message || "Could not react", "error"); }
}

function reactionButton(m, r) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "reaction";
  const mine = r.user_ids.includes(myId());
  b.setAttribute("aria-pressed", String(mine));
  const who = r.user_ids.map((u) => nameOf(u)).join(", ");
  b.textContent = `${r.emoji} ${r.user_ids.length}`;
  b.title = who;
  b.setAttribute("aria-label", `${emojiName(r.emoji)}, ${r.user_ids.length}: ${who}. ${mine ? "Remove your reaction" : "React with " + emojiName(r.emoji)}`);
  b.dataset.reaction = r.emoji;
  b.addEventListener("click", () => reactionToggle(m, r.emoji));
  return b;
}

// The reactions under a message, and the "React" button that opens the picker (a toolbar of emoji buttons).
export function reactionsBar(m) {
  const bar = document.createElement("div");
  bar.className = "reactions";
  bar.setAttribute("role", "group");
  bar.setAttribute("aria-label", "Reactions");
  for (const r of m.reactions || []) bar.append(reactionButton(m, r));
  const open = state.pickerFor === m.id;
  const react = document.createElement("button");
  react.type = "button";
  react.className = "react-open";
  react.textContent = "☺+";
  react.setAttribute("aria-label", "Add reaction");
  react.setAttribute("aria-expanded", String(open));
  react.dataset.pickerOf = m.id;
  react.addEventListener("click", () => { state.pickerFor = open ? null : m.id; redraw(); focusPicker(m.id, !open); });
  bar.append(react);
  if (open) {
    const picker = document.createElement("div");
    picker.className = "picker";
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-label", "Pick a reaction");
    for (const e of REACTION_EMOJI) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = e;
      b.setAttribute("aria-label", `React with ${emojiName(e)}`);
      b.addEventListener("click", () => { state.pickerFor = null; reactionToggle(m, e); redraw(); focusPicker(m.id, false); });
      b.addEventListener("keydown", (ev) => { if (ev.key === "Escape") { state.pickerFor = null; redraw(); focusPicker(m.id, false); } });
      picker.append(b);
    }
    bar.append(picker);
  }
  return bar;
}

function focusPicker(messageId, intoPicker) {
  const list = $("messages");
  const opener = list.querySelector(`[data-picker-of="${CSS.escape(messageId)}"]`);
  const first = intoPicker && opener && opener.parentElement.querySelector(".picker button");
  (first || opener || $("composer-input")).focus();
}
